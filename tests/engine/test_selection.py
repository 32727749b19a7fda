"""Channel scoring and the grouped-query index mapping."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, MLP, lora_model, make_batch, tiny_llama
from transformers.models.llama.modeling_llama import repeat_kv

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.engine.estimator import svd_factors, whitened_svd_factors
from sparselora.engine.selection import (
    kv_to_query_channels,
    num_kept,
    qk_kv_scores,
    top_k_sorted,
)


def paired_key_channel(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """For each query channel, the key channel HF's repeat_kv pairs it with: (nh*hd,)."""
    key_ids = torch.arange(num_kv_heads * head_dim).view(1, num_kv_heads, 1, head_dim).float()
    return repeat_kv(key_ids, num_heads // num_kv_heads).reshape(-1).long()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3), (6, 1)])
def test_query_channels_follow_repeat_kv(heads, kv_heads):
    head_dim = 4
    paired = paired_key_channel(heads, kv_heads, head_dim)
    kv_idx = torch.randperm(kv_heads * head_dim)[: max(1, kv_heads * head_dim // 3)].sort().values
    q_idx = kv_to_query_channels(kv_idx, heads, kv_heads, head_dim)
    expected = torch.nonzero(torch.isin(paired, kv_idx)).squeeze(1)
    assert torch.equal(q_idx, expected)
    assert torch.equal(q_idx, q_idx.sort().values)


def test_qk_scores_average_the_query_heads_that_read_each_kv_channel():
    heads, kv_heads, head_dim, tokens = 8, 2, 4, 5
    q_hat = torch.randn(tokens, heads * head_dim)
    k_hat = torch.randn(tokens, kv_heads * head_dim)
    paired = paired_key_channel(heads, kv_heads, head_dim)
    q_norm, k_norm = q_hat.norm(dim=0), k_hat.norm(dim=0)
    expected = torch.stack(
        [k_norm[c] * q_norm[paired == c].mean() for c in range(kv_heads * head_dim)]
    )
    torch.testing.assert_close(qk_kv_scores(q_hat, k_hat, heads, kv_heads), expected)


def test_num_kept_and_topk():
    assert num_kept(100, 0.9) == 10
    assert num_kept(14336, 0.99) == 143
    assert num_kept(10, 0.999) == 1
    scores = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0])
    assert top_k_sorted(scores, 3).tolist() == [1, 2, 4]


@pytest.mark.parametrize("kind", ["svd", "whitened_svd"])
def test_full_rank_estimator_selects_the_oracle_channels(kind):
    model = lora_model(tiny_llama(kv_heads=2), ATTN + MLP)
    batch = make_batch(padding="left")
    common = dict(ffn_sparsity=0.75, attn_sparsity=0.5, start_step=0.0, estimator=kind)
    oracle = apply_sparselora(
        model,
        SparseLoRAConfig(ffn_criterion="oracle", attn_criterion="oracle", **common),
        use_cache=False,
    )
    model(**batch)
    expected = oracle.last_selection()
    oracle.remove()
    estimated = apply_sparselora(
        model,
        SparseLoRAConfig(estimator_rank=64, calibration_tokens=1, **common),
        use_cache=False,
        calibration=[make_batch(batch=4, length=24, seed=7)] if kind == "whitened_svd" else None,
    )
    assert estimated.estimator.rank == 64
    model(**batch)
    chosen = estimated.last_selection()
    assert chosen.keys() == expected.keys()
    for layer in chosen:
        for proj, idx in chosen[layer].items():
            assert torch.equal(idx, expected[layer][proj]), (layer, proj)


def test_whitened_estimator_error_not_above_plain_svd_on_heldout_inputs():
    torch.manual_seed(0)
    dim_in, dim_out, rank = 48, 80, 6
    mixing = torch.randn(dim_in, dim_in) * torch.logspace(0, -2, dim_in).unsqueeze(1)
    calib, heldout = torch.randn(2000, dim_in) @ mixing, torch.randn(500, dim_in) @ mixing
    weight = torch.randn(dim_out, dim_in)
    truth = heldout @ weight.T

    def error(a, b):
        return ((heldout @ a @ b - truth).norm() / truth.norm()).item()

    plain = error(*svd_factors(weight, rank))
    whitened = error(*whitened_svd_factors(weight, calib.T @ calib / len(calib), rank, 1e-4))
    assert whitened <= plain
    assert whitened < 0.9 * plain  # on correlated inputs the gain is large, not a tie


def test_output_positions_alignment():
    from sparselora.engine.state import output_positions

    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    shifted = output_positions(labels, "dense")
    assert shifted.tolist() == [
        [False, True, True, False, False],
        [True, False, False, False, False],
    ]
    assert torch.equal(output_positions(labels, "dense_labelled"), labels != -100)


def test_scored_tokens_are_the_real_ones_evenly_strided():
    from sparselora.engine.selection import scored_tokens

    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    assert scored_tokens(x, mask, None).flatten().tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert scored_tokens(x, mask, 3).flatten().tolist() == [0, 6, 9]
    assert scored_tokens(x, mask, 100).shape == (8, 1)


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("length", [5, 37, 70])  # under, over and across the 32-row chunks
def test_ffn_scores_are_the_column_norms_of_act_gate_times_up(per_token, length):
    from sparselora.engine.selection import SCORE_CHUNK_ROWS, ffn_scores

    assert SCORE_CHUNK_ROWS == 32  # the lengths above straddle it
    generator = torch.Generator().manual_seed(0)
    hidden, width = 6, 11
    x = torch.randn(2, length, hidden, generator=generator)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, : length // 3] = False
    w_gate = torch.randn(width, hidden, generator=generator)
    w_up = torch.randn(width, hidden, generator=generator)
    before = x.clone()

    scores = ffn_scores(
        x, mask, lambda p: p @ w_gate.T, lambda p: p @ w_up.T, torch.nn.SiLU(), per_token
    )

    weights = mask.float().unsqueeze(-1)
    points = x[mask] if per_token else (x * weights).sum(1) / weights.sum(1)
    expected = (torch.nn.functional.silu(points @ w_gate.T) * (points @ w_up.T)).norm(dim=0)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before)


def test_ffn_scores_of_no_tokens_are_zero_for_every_channel():
    from sparselora.engine.selection import ffn_scores

    x, mask = torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool)
    w = torch.randn(5, 3)
    scores = ffn_scores(x, mask, lambda p: p @ w.T, lambda p: p @ w.T, torch.nn.SiLU(), True)
    assert torch.equal(scores, torch.zeros(5))
