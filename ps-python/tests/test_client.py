"""Pull and push round trips, bad input, and the GIL, against real servers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import ps_client
from ps_client import Client, PsError

SGD = {"kind": "sgd", "lr": 1.0}


def sparse(client: Client, name: str = "emb", dim: int = 4, init=None) -> None:
    client.create_table(
        name,
        kind="sparse",
        dim=dim,
        initializer=init or {"kind": "zeros"},
        optimizer=SGD,
    )


def test_pull_returns_each_keys_row_in_the_callers_order(servers):
    client = Client(servers.addrs)
    sparse(client, init={"kind": "uniform", "low": -0.5, "high": 0.5})
    keys = np.array([7, 3, 7, 2**63 + 5, 0], dtype=np.uint64)
    rows = client.pull("emb", keys)
    assert rows.shape == (5, 4) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[0], rows[2])  # a duplicate is the same row
    again = client.pull("emb", keys[::-1].copy())
    np.testing.assert_array_equal(again, rows[::-1])
    assert client.num_shards == 2


def test_pull_keeps_the_keys_shape():
    keys = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert ps_client._client._keys(keys).shape == (2, 3)


def test_signed_ids_are_their_twos_complement_bits(servers):
    client = Client(servers.addrs)
    sparse(client, init={"kind": "uniform", "low": -0.5, "high": 0.5})
    signed = client.pull("emb", np.array([-1, -(2**63)], dtype=np.int64))
    unsigned = client.pull("emb", np.array([2**64 - 1, 2**63], dtype=np.uint64))
    np.testing.assert_array_equal(signed, unsigned)


def test_push_applies_the_summed_gradient_of_duplicate_keys(servers):
    client = Client(servers.addrs)
    sparse(client)
    keys = np.array([1, 2, 1, 3], dtype=np.uint64)
    grads = np.arange(16, dtype=np.float32).reshape(4, 4)
    client.push("emb", keys, grads)
    client.flush()
    rows = client.pull("emb", np.array([1, 2, 3], dtype=np.uint64))
    # sgd, lr 1: row -= sum of its gradients
    np.testing.assert_allclose(rows[0], -(grads[0] + grads[2]))
    np.testing.assert_allclose(rows[1], -grads[1])
    np.testing.assert_allclose(rows[2], -grads[3])


def test_lr_scale_multiplies_the_servers_learning_rate(servers):
    client = Client(servers.addrs)
    sparse(client, dim=1)
    client.push("emb", [5], np.ones((1, 1), np.float32), lr_scale=0.25)
    client.flush()
    np.testing.assert_allclose(client.pull("emb", [5]), [[-0.25]])


def test_many_keys_cross_every_shard_and_chunk(servers):
    client = Client(servers.addrs)
    sparse(client, dim=2)
    keys = np.random.default_rng(0).integers(0, 2**63, size=200_000, dtype=np.uint64)
    grads = np.ones((len(keys), 2), np.float32)
    client.push("emb", keys, grads)
    client.flush()
    rows = client.pull("emb", keys)
    assert np.all(rows == -1.0)
    per_shard = [s["tables"]["emb"]["rows"] for s in client.stats()]
    assert sum(per_shard) == len(np.unique(keys)) and min(per_shard) > 0


def test_dense_tables_and_checkpoints(servers):
    client = Client(servers.addrs)
    client.create_table(
        "bias", kind="dense", rows=4, dim=1,
        initializer={"kind": "zeros"}, optimizer=SGD,
    )
    client.push("bias", [0, 3], np.array([[1.0], [2.0]], np.float32))
    written = client.checkpoint("c1")
    assert len(written) == 2 and sum(w["rows"] for w in written) == 4
    np.testing.assert_allclose(client.pull("bias", [0, 1, 2, 3])[:, 0], [-1, 0, 0, -2])


def test_create_table_is_idempotent_and_refuses_another_spec(servers):
    client = Client(servers.addrs)
    sparse(client)
    sparse(client)
    with pytest.raises(PsError) as e:
        sparse(client, dim=8)
    assert e.value.code == "ALREADY_EXISTS"
    assert "dim" in e.value.message


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"kind": "sparse", "dim": 4, "initializer": {"kind": "zeros"}, "optimizer": SGD, "colour": 1}, "colour"),
        ({"kind": "sparse", "dim": 4, "initializer": {"kind": "zeros"}}, "optimizer"),
        ({"kind": "sparse", "dim": 4, "rows": 3, "initializer": {"kind": "zeros"}, "optimizer": SGD}, "rows"),
        ({"kind": "dense", "dim": 4, "initializer": {"kind": "zeros"}, "optimizer": SGD}, "rows"),
        ({"kind": "sparse", "dim": 0, "initializer": {"kind": "zeros"}, "optimizer": SGD}, "dim"),
        ({"kind": "sparse", "dim": 4, "initializer": {"kind": "zeros"}, "optimizer": {"kind": "sgd", "lr": -1}}, "lr"),
    ],
)
def test_a_bad_table_spec_is_refused_naming_the_key(servers, spec, says):
    client = Client(servers.addrs)
    with pytest.raises(PsError) as e:
        client.create_table("t", **spec)
    assert e.value.code == "INVALID_ARGUMENT"
    assert says in e.value.message
    assert all("t" not in s["tables"] for s in client.stats())


def snapshot(client: Client, keys) -> np.ndarray:
    client.flush()
    return client.pull("emb", keys)


def test_bad_pushes_raise_and_leave_the_servers_unchanged(servers):
    client = Client(servers.addrs)
    sparse(client, init={"kind": "uniform", "low": -0.5, "high": 0.5})
    keys = np.arange(100, dtype=np.uint64)
    before = snapshot(client, keys)
    bad_grads = np.ones((100, 4), np.float32)
    bad_grads[57, 2] = np.nan
    cases = [
        ("unknown table", lambda: client.push("nope", keys, np.ones((100, 4), np.float32)), "INVALID_ARGUMENT", "nope"),
        ("wrong dim", lambda: client.push("emb", keys, np.ones((100, 3), np.float32)), "INVALID_ARGUMENT", "dim 4"),
        ("too few rows", lambda: client.push("emb", keys, np.ones((99, 4), np.float32)), "INVALID_ARGUMENT", "99"),
        ("nan", lambda: client.push("emb", keys, bad_grads), "INVALID_ARGUMENT", "not finite"),
        ("inf", lambda: client.push("emb", keys, np.full((100, 4), np.inf, np.float32)), "INVALID_ARGUMENT", "not finite"),
        ("negative lr_scale", lambda: client.push("emb", keys, np.ones((100, 4), np.float32), lr_scale=-1), "INVALID_ARGUMENT", "lr_scale"),
        ("pull unknown table", lambda: client.pull("nope", keys), "INVALID_ARGUMENT", "nope"),
    ]
    for what, call, code, says in cases:
        with pytest.raises(PsError) as e:
            call()
        assert e.value.code == code, what
        assert says in e.value.message, (what, e.value.message)
    np.testing.assert_array_equal(snapshot(client, keys), before)
    assert client.push_acks()["acked"] == 0


def test_float_keys_are_a_type_error(servers):
    client = Client(servers.addrs)
    sparse(client)
    with pytest.raises(TypeError, match="integers"):
        client.pull("emb", np.array([1.5]))


def test_a_server_that_refuses_says_why(servers):
    # Over the server's own limit: the status comes from the server.
    client = Client(servers.addrs)
    with pytest.raises(PsError) as e:
        client.create_table(
            "big", kind="dense", rows=1 << 30, dim=1,
            initializer={"kind": "zeros"}, optimizer=SGD,
        )
    assert e.value.code == "RESOURCE_EXHAUSTED", e.value
    assert "big" in e.value.message


def test_connecting_to_nothing_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(PsError) as e:
        Client(["127.0.0.1:1"], connect_timeout=0.5)
    assert e.value.code == "UNAVAILABLE", e.value
    assert time.monotonic() - start < 20


def test_arguments_are_checked_before_connecting():
    with pytest.raises(PsError, match="servers"):
        Client([])
    with pytest.raises(PsError, match="etcd and job"):
        Client(etcd="127.0.0.1:2379")
    with pytest.raises(PsError, match="connect_timeout"):
        Client(["127.0.0.1:1"], connect_timeout=-1)
    with pytest.raises(PsError, match="token"):
        Client(["127.0.0.1:1"], token_file="/nonexistent/token")
    with pytest.raises(TypeError, match="tls"):
        Client(["127.0.0.1:1"], tls={"certificate": "x"})


def test_a_thread_runs_while_a_pull_waits(servers):
    """The GIL is released while the client waits on the network."""
    client = Client(servers.addrs)
    sparse(client, dim=64)
    keys = np.arange(1_000_000, dtype=np.uint64)
    ticks: list[float] = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    thread = threading.Thread(target=count)
    thread.start()
    time.sleep(0.05)
    start = time.monotonic()
    client.pull("emb", keys)  # a few hundred ms: rows are created on both shards
    end = time.monotonic()
    stop.set()
    thread.join()
    during = [t for t in ticks if start < t < end]
    assert end - start > 0.05, "the pull was too quick to tell"
    assert len(during) >= 5, f"{len(during)} ticks in a {end - start:.3f} s pull"


def test_help_shows_the_api():
    for item in (Client, Client.pull, Client.push, Client.create_table, ps_client.PsError):
        assert item.__doc__ and len(item.__doc__) > 40
