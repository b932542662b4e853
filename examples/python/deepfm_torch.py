"""DeepFM on a9a in PyTorch, its embedding tables on running ps-servers.

    cargo build --release -p ps-server
    target/release/ps-server --listen 127.0.0.1:7000 --shard-id 0 --num-shards 2 &
    target/release/ps-server --listen 127.0.0.1:7001 --shard-id 1 --num-shards 2 &
    python examples/python/deepfm_torch.py --servers 127.0.0.1:7000,127.0.0.1:7001

The first-order weights and the factors are sparse tables on the servers,
trained there by Adagrad; the bias and the MLP are PyTorch parameters
trained by Adam. Prints one JSON line: val_auc, val_logloss, samples/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import ps_client
from ps_client.metrics import logloss, roc_auc
from ps_client.torch import ShardedEmbedding, ShardedEmbeddingBag

DATA = Path(__file__).resolve().parents[2] / "data" / "a9a"


class DeepFM(torch.nn.Module):
    """Bias + linear + FM interactions + an MLP over the summed factors."""

    def __init__(self, client: ps_client.Client, prefix: str, hidden: list[int]):
        super().__init__()
        self.linear = ShardedEmbeddingBag(client, f"{prefix}.w", mode="sum")
        self.factors = ShardedEmbedding(client, f"{prefix}.v")
        self.bias = torch.nn.Parameter(torch.zeros(1))
        layers, width = [], self.factors.embedding_dim
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers.append(torch.nn.Linear(width, 1))
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, ids, values, offsets, bag):
        n = len(offsets)
        linear = self.linear(ids, offsets, per_sample_weights=values)[:, 0]
        v = self.factors(ids) * values[:, None]  # (ids, k)
        summed = torch.zeros(n, v.shape[1]).index_add_(0, bag, v)
        squares = torch.zeros(n, v.shape[1]).index_add_(0, bag, v * v)
        fm = 0.5 * (summed * summed - squares).sum(1)
        return self.bias + linear + fm + self.mlp(summed)[:, 0]


def tensors(rows: ps_client.data.SparseRows):
    lengths = np.diff(rows.offsets)
    return (
        torch.from_numpy(rows.ids.view(np.int64)),
        torch.from_numpy(rows.values),
        torch.from_numpy(rows.offsets[:-1]),
        torch.repeat_interleave(torch.arange(len(rows)), torch.from_numpy(lengths)),
        torch.from_numpy(rows.labels),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", required=True, help="the shards' addresses, comma-separated, in shard order")
    p.add_argument("--train", default=DATA / "a9a.train.libsvm", type=Path)
    p.add_argument("--validation", default=DATA / "a9a.test.libsvm", type=Path)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dim", type=int, default=8, help="factors per feature")
    p.add_argument("--prefix", default="deepfm", help="table names: PREFIX.w and PREFIX.v")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    client = ps_client.Client(args.servers)
    client.create_table(
        f"{args.prefix}.w", kind="sparse", dim=1,
        initializer={"kind": "zeros"},
        optimizer={"kind": "adagrad", "lr": 0.05},
    )
    # Adagrad's accumulator starts at 0: its steps do not depend on the
    # scale of the batch-mean gradients (see the README's "Tuning").
    client.create_table(
        f"{args.prefix}.v", kind="sparse", dim=args.dim,
        initializer={"kind": "normal", "std": 0.01},
        optimizer={"kind": "adagrad", "lr": 0.05},
    )
    model = DeepFM(client, args.prefix, hidden=[64, 64])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = ps_client.load_libsvm(args.train)
    validation = ps_client.load_libsvm(args.validation)
    rng = np.random.default_rng(args.seed)

    started, seen = time.perf_counter(), 0
    for _ in range(args.epochs):
        model.train()
        order = rng.permutation(len(train))
        for start in range(0, len(order), args.batch_size):
            ids, values, offsets, bag, labels = tensors(train.batch(order[start : start + args.batch_size]))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(ids, values, offsets, bag), labels
            )
            optimizer.zero_grad()
            loss.backward()  # pushes the sparse rows' gradients
            optimizer.step()
            seen += len(labels)
    client.flush()
    elapsed = time.perf_counter() - started

    model.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(validation), 4096):
            ids, values, offsets, bag, _ = tensors(validation.batch(np.arange(start, min(start + 4096, len(validation)))))
            scores.append(torch.sigmoid(model(ids, values, offsets, bag)).numpy())
    p_val = np.concatenate(scores)
    print(json.dumps({
        "model": "deepfm",
        "examples": len(validation),
        "val_auc": round(roc_auc(validation.labels, p_val), 6),
        "val_logloss": round(logloss(validation.labels, p_val), 6),
        "train_samples_per_s": round(seen / elapsed, 1),
    }))


if __name__ == "__main__":
    main()
