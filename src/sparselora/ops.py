"""Sparse linear primitives on frozen weights (no transformers import).

A frozen weight never needs a gradient, so the backward of a sliced matmul needs only the input
gradient through the same slice: plain autograd over `index_select` + `F.linear` computes exactly
that (the slice of a frozen weight is a constant to autograd). Shapes: n tokens, in/out features,
k kept channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor
) -> torch.Tensor:
    """Only the kept output channels: x (n, in) -> (n, k) = x W[rows]^T + b[rows]."""
    kept_bias = None if bias is None else bias.index_select(0, rows)
    return F.linear(x, weight.index_select(0, rows), kept_bias)


def cols_linear(
    x_kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor
) -> torch.Tensor:
    """Only the kept input channels: x_kept (n, k) -> (n, out) = x_kept W[:, cols]^T + b."""
    return F.linear(x_kept, weight.index_select(1, cols), bias)


def scatter_channels(y_kept: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """Place (n, k) values at channels `cols` of an (n, width) tensor of zeros."""
    out = y_kept.new_zeros(y_kept.shape[0], width)
    return out.index_copy(1, cols, y_kept)


class TokenSplit:
    """Flattened token positions of one micro-batch, split into sparse, dense and skipped sets.

    `sparse_rows` (n_s,), `dense_rows` (n_d,) and `skip_rows` (n_k,) index the B*L flattened
    tokens; together they are a permutation of 0..B*L-1. Skipped rows (tokens whose output
    nothing reads) take precedence over sparse ones. `merge` puts per-set results back in
    token order, with zeros for skipped rows.
    """

    def __init__(self, sparse_mask: torch.Tensor, skip_mask: torch.Tensor | None = None) -> None:
        sparse = sparse_mask.reshape(-1)  # (B*L,)
        self.sparse_mask = sparse
        self.num_tokens = sparse.numel()
        skip = torch.zeros_like(sparse) if skip_mask is None else skip_mask.reshape(-1)
        self.sparse_rows = (sparse & ~skip).nonzero().squeeze(1)
        self.dense_rows = (~sparse & ~skip).nonzero().squeeze(1)
        self.skip_rows = skip.nonzero().squeeze(1)
        order = torch.cat([self.sparse_rows, self.dense_rows, self.skip_rows])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=order.device)

    @property
    def all_sparse(self) -> bool:
        return self.sparse_rows.numel() == self.num_tokens

    @property
    def all_dense(self) -> bool:
        return self.dense_rows.numel() == self.num_tokens

    def merge(self, y_sparse: torch.Tensor, y_dense: torch.Tensor) -> torch.Tensor:
        """(n_s, C) and (n_d, C) -> (B*L, C) in token order, zeros at skipped rows."""
        parts = [y_sparse, y_dense]
        if self.skip_rows.numel():
            parts.append(y_dense.new_zeros(self.skip_rows.numel(), y_dense.shape[-1]))
        return torch.cat(parts).index_select(0, self.inverse)
