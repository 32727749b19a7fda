"""Numerical equivalence of the sparse blocks (fp32).

Tolerances (relative L2): sparsity 0 / disabled vs plain PEFT LoRA: 1e-6; sparse vs the
masked-dense reference: 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, MLP, lora_model, make_batch, sparse_config, tiny_llama
from reference import assert_close, install_masks, loss_and_grads, rel_err

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.engine import ops

EXACT = 1e-6
SPARSE = 1e-5


def config(**overrides) -> SparseLoRAConfig:
    return sparse_config(channels_only=True, **overrides)


@pytest.mark.parametrize("targets", [ATTN, ATTN + MLP])
def test_near_zero_sparsity_matches_peft(targets):
    """Every channel kept: the sparse code path must reproduce PEFT LoRA exactly."""
    model = lora_model(tiny_llama(kv_heads=2), targets)
    batch = make_batch(padding="right")
    expected = loss_and_grads(model, batch)
    handle = apply_sparselora(model, config(ffn_sparsity=1e-9, attn_sparsity=1e-9), use_cache=False)
    result = loss_and_grads(model, batch)
    assert len(handle.last_selection()) == 3  # the sparse path really ran
    assert_close(result, expected, EXACT)


def test_disabled_and_dense_match_peft():
    model = lora_model(tiny_llama(), ATTN + MLP)
    batch = make_batch()
    expected = loss_and_grads(model, batch)
    handle = apply_sparselora(model, config(ffn_sparsity=0.75, attn_sparsity=0.75), use_cache=False)
    assert rel_err(loss_and_grads(model, batch)[0], expected[0]) > 1e-4  # sparse differs
    handle.disable()
    assert_close(loss_and_grads(model, batch), expected, EXACT)
    handle.enable()
    with handle.dense():
        assert_close(loss_and_grads(model, batch), expected, EXACT)


CASES = {
    "mha-attn-lora": dict(kv_heads=4, targets=ATTN),
    "gqa-attn-lora": dict(kv_heads=2, targets=ATTN),
    "gqa-mlp-lora": dict(kv_heads=2, targets=ATTN + MLP),
    "mqa-mlp-lora-sparse-branch": dict(kv_heads=1, targets=ATTN + MLP, sparse_lora_branch=True),
    "gqa-bias": dict(kv_heads=2, targets=ATTN + MLP, bias=True),
    "gqa-eager": dict(kv_heads=2, targets=ATTN, attn_impl="eager"),
    "seq-mean": dict(kv_heads=2, targets=ATTN, ffn_criterion="seq_mean"),
    "random": dict(kv_heads=2, targets=ATTN + MLP, ffn_criterion="random", attn_criterion="random"),
    "dense-labelled": dict(kv_heads=2, targets=ATTN, output_tokens="dense_labelled"),
}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_matches_masked_dense_reference(case, padding):
    check_against_masked_dense(case, make_batch(padding=padding))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", ["gqa-mlp-lora", "gqa-bias", "mqa-mlp-lora-sparse-branch"])
def test_dense_tokens_through_transposed_gemms_match_the_reference(case, padding, monkeypatch):
    """16 dense tokens (4 rows with 4 answer tokens): the dense tokens' frozen GEMMs with at
    least 4 outputs per row (q, o: 64; gate, up: 96; down: 64) run as (W x^T)^T and their
    backward as (W^T g^T)^T (`ops.TransposedLinear`); still equal to the reference."""
    calls = []
    apply = ops.TransposedLinear.apply
    monkeypatch.setattr(
        ops.TransposedLinear, "apply", lambda x, w: calls.append(w.shape) or apply(x, w)
    )
    batch = make_batch(batch=4, length=14, padding=padding, out_tokens=4)
    check_against_masked_dense(case, batch)
    # 3 sparse FFN layers x (gate, up, down) + 2 sparse attention layers x (q, o), each once
    # in the sparse forward (the masked-dense reference runs the plain layers); k and v (8-32
    # outputs) stay on the layer
    assert len(calls) == 3 * 3 + 2 * 2


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", ["gqa-mlp-lora", "gqa-bias", "mqa-mlp-lora-sparse-branch"])
def test_few_dense_tokens_through_the_skinny_gemms_match_the_reference(case, padding, monkeypatch):
    """4 dense tokens (4 rows with 1 answer token each, as a commonsense batch has few): with
    the weight-size floor lowered to the tiny model's, their frozen GEMMs run as (W x^T)^T with
    the row-blocked input gradient (`ops.blocked_input_grad`, blocks of 16 rows); still equal
    to the reference. In float64: the float32 rounding of the changed summation order alone
    reaches 2e-5 on this batch (both the skinny and the plain products: 1e-14 in float64)."""
    monkeypatch.setattr(ops, "SKINNY_MIN_WEIGHT", 1)
    monkeypatch.setattr(ops, "GRAD_BLOCK_ROWS", 16)
    calls = []
    blocked = ops.blocked_input_grad
    monkeypatch.setattr(
        ops, "blocked_input_grad", lambda g, w: calls.append(w.shape) or blocked(g, w)
    )
    batch = make_batch(batch=4, length=14, padding=padding, out_tokens=1)
    check_against_masked_dense(case, batch, torch.float64, 1e-10)
    # every dense-token product of a sparse block (3 FFN layers x gate, up, down; 2 attention
    # layers x q, k, v, o), once each in backward; k and v have 8-32 rows: one block or none
    assert len(calls) == 3 * 3 + 2 * 4
    assert any(shape[0] >= 2 * 16 for shape in calls)  # some ran as several blocks


def check_against_masked_dense(
    case: str, batch: dict, dtype: torch.dtype = torch.float32, tol: float = SPARSE
) -> None:
    spec = dict(CASES[case])
    targets = spec.pop("targets")
    model_kwargs = {k: spec.pop(k) for k in ("kv_heads", "bias", "attn_impl") if k in spec}
    model = lora_model(tiny_llama(**model_kwargs).to(dtype), targets)
    dense = loss_and_grads(model, batch)

    cfg = config(**spec)
    handle = apply_sparselora(model, cfg, use_cache=False)
    result = loss_and_grads(model, batch)
    chosen = handle.last_selection()
    assert sorted(chosen) == [0, 1, 2]
    assert all(len(chosen[i]["gate_proj"]) == 48 for i in chosen)  # half of 96
    assert all(len(chosen[i]["k_proj"]) == model_kwargs["kv_heads"] * 8 for i in (1, 2))
    handle.remove()

    labelled = batch["labels"] != -100
    if cfg.output_tokens == "dense_labelled":
        sparse_tokens = ~labelled
    else:  # position t is dense when it predicts a labelled token t + 1
        sparse_tokens = torch.ones_like(labelled)
        sparse_tokens[:, :-1] = ~labelled[:, 1:]
    hooks = install_masks(model, chosen, sparse_tokens, cfg.sparse_lora_branch)
    expected = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    assert rel_err(expected[1], dense[1]) > 1e-4  # the reference is really sparse
    assert_close(result, expected, tol)


def test_positions_predicting_labels_run_dense():
    """Every token labelled: every position but the last predicts a labelled token, so only
    the last position (whose logits no loss reads) is sparse; loss and gradients are exact."""
    model = lora_model(tiny_llama(), ATTN)
    batch = make_batch()
    batch["labels"] = batch["input_ids"].clone()
    loss, logits, grads = loss_and_grads(model, batch)
    apply_sparselora(model, config(ffn_sparsity=0.9, attn_sparsity=0.9), use_cache=False)
    sparse_loss, sparse_logits, sparse_grads = loss_and_grads(model, batch)
    assert rel_err(sparse_loss, loss) < EXACT
    assert rel_err(sparse_logits[:, :-1], logits[:, :-1]) < EXACT
    assert rel_err(sparse_logits[:, -1], logits[:, -1]) > 1e-4  # the last position was sparse
    for name, grad in grads.items():
        assert rel_err(sparse_grads[name], grad) < EXACT, name


def test_detach_sparse_base_cuts_attention_input_gradient():
    """The reference's no_grad bug, reproduced on demand: input gradients change, LoRA-only
    gradients of the last layer's q/k/v do not depend on it."""
    model = lora_model(tiny_llama(), ATTN)
    batch = make_batch()
    handle = apply_sparselora(model, config(ffn_sparsity={}), use_cache=False)
    exact = loss_and_grads(model, batch)
    handle.remove()
    handle = apply_sparselora(
        model, config(ffn_sparsity={}, detach_sparse_base=True), use_cache=False
    )
    cut = loss_and_grads(model, batch)
    assert rel_err(cut[0], exact[0]) < EXACT  # same forward
    assert rel_err(cut[2]["inputs_embeds"], exact[2]["inputs_embeds"]) > 1e-3


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("criterion", ["per_token", "random"])
def test_gradient_checkpointing_reselects_same_channels(reentrant, criterion):
    model = lora_model(tiny_llama(), ATTN + MLP)
    batch = make_batch(padding="left")
    cfg = config(
        ffn_criterion=criterion, attn_criterion="random" if criterion == "random" else "norm"
    )
    handle = apply_sparselora(model, cfg, use_cache=False)
    expected = loss_and_grads(model, batch)
    handle.remove()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    handle = apply_sparselora(model, cfg, use_cache=False)
    calls = []
    for block in handle.blocks.values():  # count selections: recomputation must reuse them
        original = block._choose_ffn
        block._choose_ffn = lambda *a, _o=original: calls.append(1) or _o(*a)
    result = loss_and_grads(model, batch)
    assert len(calls) == 3
    assert_close(result, expected, SPARSE)
