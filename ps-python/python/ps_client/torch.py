"""PyTorch modules whose embedding rows live on the parameter servers.

Forward pulls the rows of the batch's distinct ids; backward pushes their
gradients to the servers' optimizer (asynchronously: the next pull may not
see them yet, as with the Rust workers). The dense part of a model stays in
PyTorch and is trained by a PyTorch optimizer.

>>> from ps_client.torch import ShardedEmbeddingBag
>>> bag = ShardedEmbeddingBag(client, "emb", mode="mean")
>>> pooled = bag(ids, offsets)        # like torch.nn.EmbeddingBag
>>> loss(model(pooled)).backward()    # pushes the rows' gradients
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._client import Client


class PullRows(torch.autograd.Function):
    """Rows of distinct ids from a table; their gradient is pushed back.

    ``apply(anchor, client, table, ids, lr_scale)``: ``anchor`` is an empty
    tensor that requires grad (so that backward runs), ``ids`` a uint64
    numpy array of distinct ids. Returns a ``(len(ids), dim)`` float32
    tensor on the CPU.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, client: Client, table: str, ids: np.ndarray, lr_scale: float | None):
        ctx.client, ctx.table, ctx.ids, ctx.lr_scale = client, table, ids, lr_scale
        return torch.from_numpy(client.pull(table, ids))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grads = grad.detach().to("cpu", torch.float32).contiguous().numpy()
        ctx.client.push(ctx.table, ctx.ids, grads, lr_scale=ctx.lr_scale)
        return None, None, None, None, None


class ShardedEmbedding(torch.nn.Module):
    """``torch.nn.Embedding`` over a server-side table: one row per id.

    Args:
        client: the connection to the servers.
        table: a table created through ``client`` (``create_table``).
        lr_scale: multiplies the servers' learning rate for this module's
            pushes (set ``self.lr_scale`` to follow a schedule).
    """

    def __init__(self, client: Client, table: str, lr_scale: float | None = None):
        super().__init__()
        self.client, self.table, self.lr_scale = client, table, lr_scale
        self.embedding_dim = client.dim(table)
        # Makes autograd call PullRows.backward; holds no weights.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct ids' rows (on ``ids``' device), and each id's index among them."""
        unique, inverse = torch.unique(ids.reshape(-1), sorted=False, return_inverse=True)
        ids_np = unique.detach().cpu().numpy().astype(np.int64, copy=False).view(np.uint64)
        anchor = self._anchor
        if torch.is_grad_enabled() and self.training:
            anchor = anchor.detach().requires_grad_(True)
        rows = PullRows.apply(anchor, self.client, self.table, ids_np, self.lr_scale)
        return rows.to(ids.device), inverse.reshape(ids.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape): ``ids.shape + (dim,)``."""
        rows, inverse = self.rows(ids)
        return F.embedding(inverse, rows)


class ShardedEmbeddingBag(ShardedEmbedding):
    """``torch.nn.EmbeddingBag`` over a server-side table: pooled bags of ids.

    Args:
        mode: ``"sum"`` or ``"mean"`` pooling per bag.

    ``forward(ids, offsets=None, per_sample_weights=None)`` takes what
    ``torch.nn.EmbeddingBag`` takes: a 2-D ``ids`` of fixed-size bags, or a
    1-D ``ids`` with ``offsets`` marking where each bag starts;
    ``per_sample_weights`` (sum mode) weighs each id, e.g. by its feature
    value. Returns ``(bags, dim)``.
    """

    def __init__(self, client: Client, table: str, mode: str = "sum", lr_scale: float | None = None):
        super().__init__(client, table, lr_scale)
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', not {mode!r}")
        self.mode = mode

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows, inverse = self.rows(ids)
        return F.embedding_bag(
            inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights
        )
