"""Rows/s of pull and push from Python against the Rust client, same tables.

    cargo build --release -p ps-server -p ps-benches
    python ps-python/bench/rows.py            # starts 2 local ps-servers
    python ps-python/bench/rows.py --servers A,B

Each round runs `ps-bench client` (the Rust client, in its own process)
and then the same loop through `ps_client`: `--iters` pulls of `--batch`
distinct ids, one at a time, then as many asynchronous pushes and a flush,
on the table `bench.emb`. Prints one JSON line: the medians over the
rounds and Python's share of Rust's rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import ps_client

REPO = Path(__file__).resolve().parents[2]
BLOCKS = 16  # ps_benches::client_rows::BLOCKS


def batch_ids(i: int, batch: int) -> np.ndarray:
    """The ids `ps_benches::client_rows::batch_ids` gives call `i`."""
    first = (i % BLOCKS) * batch
    j = np.arange(first + 1, first + batch + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return j * np.uint64(0x9E3779B97F4A7C15)


def python_round(client: ps_client.Client, batch: int, dim: int, iters: int) -> dict:
    client.create_table(
        "bench.emb", kind="sparse", dim=dim, seed=1,
        initializer={"kind": "normal", "mean": 0.0, "std": 0.01},
        optimizer={"kind": "adagrad", "lr": 0.05, "initial_accumulator": 0.1, "eps": 1e-8},
    )
    ids = [batch_ids(i, batch) for i in range(BLOCKS)]
    grads = np.full((batch, dim), 1e-3, np.float32)
    for block in ids:
        client.pull("bench.emb", block)
    started = time.perf_counter()
    for i in range(iters):
        client.pull("bench.emb", ids[i % BLOCKS])
    pull_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(iters):
        client.push("bench.emb", ids[i % BLOCKS], grads)
    client.flush()
    push_s = time.perf_counter() - started
    return {"pull_rows_per_s": iters * batch / pull_s, "push_rows_per_s": iters * batch / push_s}


def start_servers(count: int, tmp: str) -> tuple[list[subprocess.Popen], list[str]]:
    procs, addrs = [], []
    for shard in range(count):
        proc = subprocess.Popen(
            [str(REPO / "target/release/ps-server"), "--listen", "127.0.0.1:0",
             "--shard-id", str(shard), "--num-shards", str(count), "--memory-budget", "2GiB"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
        )
        for line in proc.stdout:
            if "listening on" in line:
                addrs.append(line.split("listening on")[1].split()[0])
                break
        procs.append(proc)
    return procs, addrs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", help="running shards (default: start 2 here)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.servers:
            addrs = args.servers.split(",")
        else:
            procs, addrs = start_servers(2, tmp)
        try:
            client = ps_client.Client(addrs)
            rust, python = [], []
            for _ in range(args.rounds):
                out = subprocess.run(
                    [str(REPO / "target/release/ps-bench"), "client", "--servers", ",".join(addrs),
                     "--batch", str(args.batch), "--dim", str(args.dim), "--iters", str(args.iters)],
                    check=True, capture_output=True, text=True,
                ).stdout
                rust.append(json.loads(out.strip().splitlines()[-1]))
                python.append(python_round(client, args.batch, args.dim, args.iters))
        finally:
            for proc in procs:
                proc.terminate()
    report = {"batch": args.batch, "dim": args.dim, "rounds": args.rounds}
    for kind in ("pull", "push"):
        r = statistics.median(x[f"{kind}_rows_per_s"] for x in rust)
        py = statistics.median(x[f"{kind}_rows_per_s"] for x in python)
        report[f"rust_{kind}_rows_per_s"] = round(r)
        report[f"python_{kind}_rows_per_s"] = round(py)
        report[f"python_over_rust_{kind}"] = round(py / r, 3)
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
