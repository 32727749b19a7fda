"""Channel scoring and index mapping: which channels of each frozen block to keep.

Pure PyTorch, no transformers import. Every function works on one block of one micro-batch and
returns kept indices sorted ascending (so gathers read memory in order). Shapes use
B = batch, L = sequence length, T = number of scored tokens, H = hidden size,
I = FFN intermediate size, nh / nkv = query / key-value heads, hd = head dim.

Grouped-query layout (HF, head-major): query head h reads KV head h // G with G = nh // nkv;
query channel h*hd + d pairs with key channel (h // G)*hd + d. Attention is therefore selected
on KV channels (kvh, d), and each kept KV channel keeps the G query channels
(kvh*G + g)*hd + d, g = 0..G-1, that read it. This is the layout `repeat_kv` produces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Projection = Callable[[torch.Tensor], torch.Tensor]


def num_kept(num_channels: int, sparsity: float) -> int:
    """k = int(N * (1 - s)), at least 1. The epsilon keeps 10% of 100 at 10, not 9."""
    return max(1, min(num_channels, int(num_channels * (1.0 - sparsity) + 1e-6)))


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending. scores: (N,) -> (k,) int64."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


def random_channels(num_channels: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct channels drawn uniformly, sorted ascending (the 'random' ablation)."""
    return torch.randperm(num_channels, generator=generator)[:k].sort().values


SCORE_CHUNK_ROWS = 32
"""`ffn_scores` works through the scored points this many at a time, in place: at 8B's
(256 tokens, 14336 channels) a whole-batch act * up and its square are three fresh 15 MB
tensors, and on a CPU their first-touch page faults cost more than the arithmetic."""


def column_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each column: (T, C) -> (C,). square().sum() is ~3x faster than
    norm(dim=0) on CPU for the (tokens, channels) shapes scored here."""
    return x.square().sum(0).sqrt()


def scored_tokens(x: torch.Tensor, mask: torch.Tensor, limit: int | None) -> torch.Tensor:
    """The real tokens of x (B, L, H) where mask (B, L) is True, as (T, H); at most `limit`,
    evenly strided over the batch (deterministic, so a recomputation scores the same ones)."""
    tokens = x[mask]
    if limit is not None and tokens.shape[0] > limit:
        keep = torch.linspace(0, tokens.shape[0] - 1, limit, device=x.device).round().long()
        tokens = tokens.index_select(0, keep)
    return tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over the tokens where mask is True. x: (B, L, H), mask: (B, L) -> (B, H)."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def ffn_scores(
    x: torch.Tensor,
    mask: torch.Tensor,
    gate: Projection,
    up: Projection,
    act: Callable[[torch.Tensor], torch.Tensor],
    per_token: bool,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Score the I intermediate channels of a gated FFN.

    x: (B, L, H) block input (after the norm); mask: (B, L) bool, the tokens to score.
    gate/up map (..., H) -> (..., I): the estimator's low-rank projections, or the true ones
    for the oracle. Returns (I,) scores:
    - per_token=False (the paper): a = act(gate(x̄_b)) * up(x̄_b) for each sequence's mean
      input x̄_b, score_j = ||a[:, j]||_2 over the batch;
    - per_token=True: the same on every scored token (at most `max_tokens`, evenly strided),
      L2 over tokens.
    """
    points = scored_tokens(x, mask, max_tokens) if per_token else masked_mean(x, mask)

    def squares(chunk: torch.Tensor) -> torch.Tensor:  # (t, H) -> (I,)
        activation = act(gate(chunk))  # (t, I), a fresh tensor: safe to overwrite
        return activation.mul_(up(chunk)).square_().sum(0)

    chunks = iter(points.split(SCORE_CHUNK_ROWS))  # at least one, empty if no points
    sums = squares(next(chunks))
    for chunk in chunks:
        sums.add_(squares(chunk))
    return sums.sqrt_()


def qk_kv_scores(
    q_hat: torch.Tensor, k_hat: torch.Tensor, num_heads: int, num_kv_heads: int
) -> torch.Tensor:
    """Score KV channels for the Q/K pair.

    q_hat: (T, nh*hd), k_hat: (T, nkv*hd), estimated projections of the scored tokens.
    score(kvh, d) = ||K̂[:, kvh, d]|| * mean_g ||Q̂[:, kvh*G + g, d]||. Returns (nkv*hd,).
    """
    head_dim = k_hat.shape[-1] // num_kv_heads
    group = num_heads // num_kv_heads
    q_norms = column_norms(q_hat).view(num_kv_heads, group, head_dim).mean(1)  # (nkv, hd)
    k_norms = column_norms(k_hat).view(num_kv_heads, head_dim)  # (nkv, hd)
    return (q_norms * k_norms).flatten()


def v_kv_scores(v_hat: torch.Tensor) -> torch.Tensor:
    """Score V channels: ||V̂[:, c]||_2 over tokens. v_hat: (T, nkv*hd) -> (nkv*hd,)."""
    return column_norms(v_hat)


def kv_to_query_channels(
    kv_idx: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Map kept KV channels to the query-side channels that read them.

    kv_idx: (k,) sorted channels kvh*hd + d. Returns (k*G,) sorted channels (kvh*G + g)*hd + d:
    the kept Q channels for a Q/K selection, or the kept o_proj input columns for a V selection.
    """
    group = num_heads // num_kv_heads
    kv_head, dim = kv_idx // head_dim, kv_idx % head_dim  # (k,)
    offsets = torch.arange(group, device=kv_idx.device)  # (G,)
    query_head = kv_head.unsqueeze(1) * group + offsets  # (k, G)
    return (query_head * head_dim + dim.unsqueeze(1)).flatten().sort().values
