"""``Client``: a connection to every shard of a job."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from . import _native
from .errors import PsError


def _keys(keys: Any) -> np.ndarray:
    """``keys`` as a C-contiguous uint64 array (int64 ids keep their bits)."""
    if hasattr(keys, "detach") and hasattr(keys, "cpu"):  # a torch tensor
        keys = keys.detach().cpu().numpy()
    array = np.asarray(keys)
    if array.dtype == np.uint64:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        if array.size == 0:
            return np.zeros(array.shape, dtype=np.uint64)
        raise TypeError(f"keys must be integers, not {array.dtype}")
    # Signed ids (hashes, torch's int64) are their two's-complement bits.
    return np.ascontiguousarray(array.astype(np.int64, copy=False).view(np.uint64))


class Client:
    """A connection to every shard of a job.

    Args:
        servers: the shards' addresses (``"host:port"``), in shard order,
            as a list or one comma-separated string. May be omitted with
            ``etcd`` and ``job``.
        etcd: etcd endpoints (list or comma-separated); with ``job``, the
            primaries are found there and a failed primary's replacement is
            awaited there.
        job: the job's name in etcd.
        token_file: a file holding the bearer token the servers require
            (``--auth-token-file``).
        tls: ``{"ca": PATH, "cert": PATH, "key": PATH}``: the CA that
            signed the servers' certificates, and this client's certificate
            and key where the servers require client certificates.
        backups: each shard's backup address, in shard order, for failover
            without a coordinator.
        connect_timeout: seconds to keep retrying a shard that refuses
            connections (and a coordinated shard without a primary).
        request_timeout: deadline of every call, in seconds.
        max_pushes_in_flight: push requests outstanding before ``push``
            waits.
        threads: threads of this client's runtime.

    Raises:
        PsError: a server could not be reached in time, is not the shard
            its position says, or an argument was wrong.
    """

    def __init__(
        self,
        servers: Sequence[str] | str | None = None,
        *,
        etcd: Sequence[str] | str | None = None,
        job: str | None = None,
        token_file: str | os.PathLike | None = None,
        tls: Mapping[str, str | os.PathLike] | None = None,
        backups: Sequence[str] | str | None = None,
        connect_timeout: float = 30.0,
        request_timeout: float = 60.0,
        max_pushes_in_flight: int = 4,
        threads: int = 2,
    ):
        tls = dict(tls or {})
        unknown = set(tls) - {"ca", "cert", "key"}
        if unknown:
            raise TypeError(f"tls takes the keys ca, cert and key, not {sorted(unknown)}")
        self._native = _native.Client(
            {
                "servers": _addresses(servers),
                "backups": _addresses(backups),
                "etcd": _addresses(etcd),
                "job": job,
                "token_file": _path(token_file),
                "tls_ca": _path(tls.get("ca")),
                "tls_cert": _path(tls.get("cert")),
                "tls_key": _path(tls.get("key")),
                "connect_timeout": float(connect_timeout),
                "request_timeout": float(request_timeout),
                "max_pushes_in_flight": int(max_pushes_in_flight),
                "threads": int(threads),
            }
        )

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return self._native.num_shards

    def create_table(self, name: str, **spec: Any) -> None:
        """Creates ``name`` on every shard; a no-op if it exists with this spec.

        The keyword arguments are a job file's ``[tables.NAME]`` keys:
        ``kind`` (``"sparse"`` or ``"dense"``), ``dim``, ``initializer``,
        ``optimizer``, and ``rows``, ``block_rows``, ``seed``, ``lifecycle``
        where the job file has them. A table created by a job file is
        reached by creating it here with the same keys.

        >>> client.create_table("emb", kind="sparse", dim=16,
        ...     initializer={"kind": "normal", "std": 0.01},
        ...     optimizer={"kind": "adagrad", "lr": 0.05, "initial_accumulator": 1e-6})

        Raises:
            PsError: ``INVALID_ARGUMENT`` for an unknown key or a bad value,
                ``ALREADY_EXISTS`` if the table exists with another spec.
        """
        self._native.create_table(name, json.dumps(spec), 1)

    def dim(self, table: str) -> int:
        """Floats per row of ``table`` (created through this client)."""
        return self._native.dim(table)

    def pull(self, table: str, keys: Any) -> np.ndarray:
        """The rows of ``keys``: a new float32 array of shape ``keys.shape + (dim,)``.

        ``keys`` is any integer array-like (numpy, list, torch tensor);
        duplicates are fetched once. A sparse table creates the rows it has
        not seen, from its initializer. The GIL is released while waiting.

        Raises:
            PsError: ``INVALID_ARGUMENT`` for a table not created through
                this client; the servers' status otherwise.
        """
        keys = _keys(keys)
        rows = self._native.pull(table, keys.reshape(-1))
        return rows.reshape(keys.shape + (rows.shape[1],))

    def push(self, table: str, keys: Any, grads: Any, lr_scale: float | None = None) -> None:
        """Pushes ``grads`` for ``keys`` to the servers' optimizer, asynchronously.

        ``grads`` has shape ``keys.shape + (dim,)`` (or ``(len(keys), dim)``);
        gradients of duplicate keys are summed. ``lr_scale`` multiplies the
        servers' learning rate for this push (a schedule). Returns once the
        requests are on their way; a failure shows in a later ``push`` or in
        ``flush``. Nothing is sent for a refused push.

        Raises:
            PsError: ``INVALID_ARGUMENT`` for a wrong shape or a gradient
                that is not finite; an earlier push's error.
        """
        keys = _keys(keys).reshape(-1)
        grads = np.asarray(grads, dtype=np.float32)
        if grads.ndim != 2:
            dim = grads.shape[-1] if grads.ndim else 0
            if grads.size != keys.size * dim:
                raise PsError(
                    "INVALID_ARGUMENT",
                    f"gradients for '{table}' have shape {grads.shape} for {keys.size} keys",
                )
            grads = grads.reshape(keys.size, dim)
        self._native.push(
            table,
            keys,
            np.ascontiguousarray(grads),
            None if lr_scale is None else float(lr_scale),
        )

    def flush(self) -> None:
        """Waits for every push so far; raises the first push error since the last check."""
        self._native.flush()

    def checkpoint(self, name: str) -> list[dict]:
        """Flushes, then writes checkpoint ``name`` on every shard.

        Returns one dict per shard: ``path``, ``rows``, ``bytes``.
        """
        return self._native.checkpoint(name)

    def stats(self) -> list[dict]:
        """Each shard's statistics: role, memory, and per table rows and bytes."""
        return self._native.stats()

    def push_acks(self) -> dict:
        """Push calls acknowledged, retried, and shards failed over so far."""
        return self._native.push_acks()

    def close(self) -> None:
        """Flushes the pushes in flight."""
        self.flush()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()


def _addresses(value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    return [str(a) for a in value]


def _path(value: str | os.PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)
