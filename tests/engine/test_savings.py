"""Exact savings: the labelled-logits head and the last layer's skipped context tokens leave
the loss and every gradient unchanged (fp32, relative L2 < 2e-6: the read tokens' FFN GEMMs
run as (W x^T)^T on CPU, `ops.frozen_linear`, which rounds differently), and really skip the
work."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ATTN,
    CHANNELS_ONLY,
    MLP,
    NO_SPARSITY,
    lora_model,
    make_batch,
    tiny_llama,
)
from conftest import (
    SAVINGS_SPARSE as SPARSE,
)
from reference import rel_err

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.engine.state import output_positions

EXACT = 2e-6


def loss_and_grads(model, batch, **extra):
    """Loss and the gradients of every trainable parameter and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        **extra,
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad.clone()
    return out.loss.detach(), grads


def assert_same(result, expected):
    loss, grads = result
    ref_loss, ref_grads = expected
    assert rel_err(loss, ref_loss) < EXACT
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < EXACT, name


def run(sparsity, padding, savings, extra=None, checkpointing=None):
    """checkpointing: None (off), or use_reentrant True / False."""
    model = lora_model(tiny_llama(kv_heads=2), ATTN + MLP)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
        )
    fields = {**sparsity, **({} if savings else CHANNELS_ONLY)}
    handle = apply_sparselora(model, SparseLoRAConfig(**fields), use_cache=False)
    model.train()
    return loss_and_grads(model, make_batch(padding=padding), **(extra or {})), handle


@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("sparsity", [NO_SPARSITY, SPARSE], ids=["dense", "sparse"])
def test_savings_leave_loss_and_gradients_unchanged(sparsity, padding):
    expected, _ = run(sparsity, padding, savings=False)
    result, handle = run(sparsity, padding, savings=True)
    assert_same(result, expected)
    assert handle.stats.flops_saved > 0  # the savings really ran


def test_savings_match_plain_peft_and_the_trainer_token_count():
    model = lora_model(tiny_llama(kv_heads=2), ATTN + MLP)
    batch = make_batch(padding="right")
    count = {"num_items_in_batch": torch.tensor(7)}  # the Trainer's tokens over accumulation
    expected = loss_and_grads(model, batch, **count)
    apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    assert_same(loss_and_grads(model, batch, **count), expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_savings_under_gradient_checkpointing(reentrant):
    expected, _ = run(SPARSE, "right", savings=False, checkpointing=reentrant)
    result, _ = run(SPARSE, "right", savings=True, checkpointing=reentrant)
    assert_same(result, expected)


def test_logits_hold_the_read_positions_and_the_last_layer_skips_context_tokens():
    model = lora_model(tiny_llama(kv_heads=2), ATTN + MLP)
    batch = make_batch(padding="left")
    with torch.no_grad():
        full = model(**batch).logits  # (B, L, V)
    handle = apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    layers = model.get_base_model().model.layers
    seen = {}

    def rows(name):
        return lambda module, args: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    hooks = [
        layers[2].mlp.down_proj.register_forward_pre_hook(rows("last_ffn")),
        layers[2].self_attn.k_proj.register_forward_pre_hook(rows("last_k")),
        layers[1].mlp.down_proj.register_forward_pre_hook(rows("middle_ffn")),
    ]
    out = model(**batch)
    read = output_positions(batch["labels"])  # (B, L)
    torch.testing.assert_close(out.logits, full[read], rtol=1e-5, atol=1e-5)
    tokens = batch["input_ids"].numel()
    assert seen["last_ffn"].shape[0] == int(read.sum()) < tokens
    assert seen["last_k"].shape[0] == seen["middle_ffn"].shape[0] == tokens

    with handle.dense():  # the plain model: full logits, every token through every layer
        assert model(**batch).logits.shape == full.shape
        assert seen["last_ffn"].shape[0] == tokens
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits.shape == full.shape  # evaluation is untouched
    model.train()
    assert model(**batch, output_hidden_states=True).logits.shape == full.shape
    for hook in hooks:
        hook.remove()
    handle.remove()
    assert "forward" not in model.get_base_model().__dict__


def test_savings_without_labels_change_nothing():
    model = lora_model(tiny_llama(kv_heads=2), ATTN)
    batch = make_batch()
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    expected = model(**unlabelled).logits
    apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    assert torch.equal(model(**unlabelled).logits, expected)


def test_calibration_batches_with_no_sparse_layer_are_not_an_error():
    """Exact savings only: nothing to estimate, so calibration batches are simply not needed."""
    model = lora_model(tiny_llama(kv_heads=2), ATTN)
    handle = apply_sparselora(
        model, SparseLoRAConfig(**NO_SPARSITY), calibration=[make_batch()], use_cache=False
    )
    assert handle.ready and handle.estimator is None


def test_labelled_logits_can_be_switched_off_on_a_live_handle():
    model = lora_model(tiny_llama(kv_heads=2), ATTN)
    batch = make_batch()
    handle = apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    read = int(output_positions(batch["labels"]).sum())
    assert model(**batch).logits.shape[0] == read
    handle.config.labelled_logits = False
    assert model(**batch).logits.shape == (*batch["input_ids"].shape, 97)
