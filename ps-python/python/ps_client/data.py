"""Reading LIBSVM files into arrays a training loop can batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    """Rows of ``id:value`` features in CSR form, with a 0/1 label per row.

    Row ``i``'s ids are ``ids[offsets[i]:offsets[i + 1]]`` and its values
    the same slice of ``values``.
    """

    labels: np.ndarray  # float32, 0 or 1
    offsets: np.ndarray  # int64, len(labels) + 1
    ids: np.ndarray  # uint64
    values: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray) -> "SparseRows":
        """The rows at the positions ``rows``, in that order."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return SparseRows(self.labels[rows], offsets, self.ids[take], self.values[take])


def load_libsvm(path: str | os.PathLike) -> SparseRows:
    """Reads a LIBSVM file (``label id:value ...`` per line).

    Labels ``1`` and ``+1`` are positive; ``0`` and ``-1`` negative.

    Raises:
        ValueError: naming the file and line of a malformed line.
    """
    labels, offsets, ids, values = [], [0], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                label = float(parts[0])
                if label not in (1.0, 0.0, -1.0):
                    raise ValueError(f"label {parts[0]!r} is not 1, 0 or -1")
                for item in parts[1:]:
                    key, _, value = item.partition(":")
                    ids.append(int(key))
                    values.append(float(value) if value else 1.0)
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)}:{number}: {e}") from None
            labels.append(1.0 if label > 0 else 0.0)
            offsets.append(len(ids))
    return SparseRows(
        np.asarray(labels, dtype=np.float32),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(ids, dtype=np.uint64),
        np.asarray(values, dtype=np.float32),
    )
