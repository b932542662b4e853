"""Logistic regression on a9a with numpy only, its weights on running ps-servers.

    python examples/python/numpy_lr.py --servers 127.0.0.1:7000,127.0.0.1:7001

The same model and settings as examples/a9a-lr.toml (sparse weights and a
dense bias, Adagrad lr 0.05 on the servers, batches of 32 in file order,
5 epochs), so its AUC is the Rust LR's. Each step pulls the batch's
distinct weights, computes the mean log-loss gradient, and pushes it
without waiting. Prints one JSON line: val_auc, val_logloss, samples/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import ps_client
from ps_client.metrics import logloss, roc_auc

DATA = Path(__file__).resolve().parents[2] / "data" / "a9a"
BIAS = np.zeros(1, dtype=np.uint64)


def predict(client: ps_client.Client, rows: ps_client.data.SparseRows, prefix: str) -> np.ndarray:
    """Probabilities of ``rows``, and the pulled weights' inverse index."""
    unique, inverse = np.unique(rows.ids, return_inverse=True)
    w = client.pull(f"{prefix}.w", unique)[:, 0]
    b = client.pull(f"{prefix}.b", BIAS)[0, 0]
    bag = np.repeat(np.arange(len(rows)), np.diff(rows.offsets))
    logits = np.bincount(bag, weights=w[inverse] * rows.values, minlength=len(rows)) + b
    return 1.0 / (1.0 + np.exp(-logits)), unique, inverse, bag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", required=True, help="the shards' addresses, comma-separated, in shard order")
    p.add_argument("--train", default=DATA / "a9a.train.libsvm", type=Path)
    p.add_argument("--validation", default=DATA / "a9a.test.libsvm", type=Path)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prefix", default="lr", help="table names: PREFIX.w and PREFIX.b")
    args = p.parse_args()

    client = ps_client.Client(args.servers)
    adagrad = {"kind": "adagrad", "lr": 0.05}
    client.create_table(f"{args.prefix}.w", kind="sparse", dim=1, initializer={"kind": "zeros"}, optimizer=adagrad)
    client.create_table(f"{args.prefix}.b", kind="dense", rows=1, dim=1, initializer={"kind": "zeros"}, optimizer=adagrad)
    train = ps_client.load_libsvm(args.train)
    validation = ps_client.load_libsvm(args.validation)

    started = time.perf_counter()
    for _ in range(args.epochs):
        for start in range(0, len(train), args.batch_size):
            batch = train.batch(np.arange(start, min(start + args.batch_size, len(train))))
            p_batch, unique, inverse, bag = predict(client, batch, args.prefix)
            g = (p_batch - batch.labels) / len(batch)  # d mean log-loss / d logit
            grad_w = np.bincount(inverse, weights=g[bag] * batch.values, minlength=len(unique))
            client.push(f"{args.prefix}.w", unique, grad_w.astype(np.float32)[:, None])
            client.push(f"{args.prefix}.b", BIAS, np.array([[g.sum()]], np.float32))
    client.flush()
    elapsed = time.perf_counter() - started

    p_val = predict(client, validation, args.prefix)[0]
    print(json.dumps({
        "model": "lr",
        "examples": len(validation),
        "val_auc": round(roc_auc(validation.labels, p_val), 6),
        "val_logloss": round(logloss(validation.labels, p_val), 6),
        "train_samples_per_s": round(args.epochs * len(train) / elapsed, 1),
    }))


if __name__ == "__main__":
    main()
