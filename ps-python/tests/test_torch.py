"""The PyTorch modules: forward pulls, backward pushes the autograd gradient."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ps_client import Client  # noqa: E402
from ps_client.torch import ShardedEmbedding, ShardedEmbeddingBag  # noqa: E402


def table(client: Client, name: str = "emb", dim: int = 3) -> None:
    client.create_table(
        name, kind="sparse", dim=dim,
        initializer={"kind": "uniform", "low": -1.0, "high": 1.0},
        optimizer={"kind": "sgd", "lr": 1.0},
    )


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_a_bag_pools_like_embedding_bag_and_pushes_its_gradient(servers, mode):
    client = Client(servers.addrs)
    table(client)
    ids = torch.tensor([4, 9, 4, 2**62, 7, 9], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 4])
    before = torch.from_numpy(client.pull("emb", ids.numpy()))
    reference = torch.nn.EmbeddingBag.from_pretrained(before, mode=mode, freeze=False)
    positions = torch.arange(len(ids))

    bag = ShardedEmbeddingBag(client, "emb", mode=mode)
    out = bag(ids, offsets)
    expected = reference(positions, offsets)
    torch.testing.assert_close(out, expected)

    weights = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [2.0, 2.0, 2.0]])
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    client.flush()
    # Each id's row moved by minus the sum of its occurrences' gradients.
    per_occurrence = reference.weight.grad
    after = torch.from_numpy(client.pull("emb", ids.numpy()))
    for i, key in enumerate(ids.tolist()):
        same = (ids == key).nonzero().flatten()
        torch.testing.assert_close(after[i], before[i] - per_occurrence[same].sum(0))


def test_per_sample_weights_scale_each_id(servers):
    client = Client(servers.addrs)
    table(client, dim=2)
    ids = torch.tensor([1, 2, 3])
    w = torch.tensor([0.5, 2.0, -1.0])
    rows = torch.from_numpy(client.pull("emb", ids.numpy()))
    out = ShardedEmbeddingBag(client, "emb")(ids, torch.tensor([0]), per_sample_weights=w)
    torch.testing.assert_close(out[0], (rows * w[:, None]).sum(0))


def test_an_embedding_keeps_the_ids_shape_and_eval_pushes_nothing(servers):
    client = Client(servers.addrs)
    table(client, dim=5)
    emb = ShardedEmbedding(client, "emb")
    ids = torch.tensor([[1, 2], [2, 3]])
    out = emb(ids)
    assert out.shape == (2, 2, 5)
    torch.testing.assert_close(out[0, 1], out[1, 0])
    emb.eval()
    with torch.no_grad():
        assert not emb(ids).requires_grad
    client.flush()
    assert client.push_acks()["acked"] == 0


def test_a_model_trains_its_sparse_and_dense_parts(servers):
    """Planted: the label is whether id 1 or 2 is in the bag; loss falls."""
    client = Client(servers.addrs)
    table(client, dim=4)
    bag = ShardedEmbeddingBag(client, "emb", mode="mean")
    head = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(150):
        ids = torch.from_numpy(rng.integers(1, 5, size=(64, 2)))
        labels = ((ids == 1) | (ids == 2)).any(1).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(bag(ids))[:, 0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    client.flush()
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), (losses[:5], losses[-5:])
