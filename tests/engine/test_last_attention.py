"""The last layer's attention core on the read query rows (`engine/attention.py`).

| what                                                         | compared            | tol  |
|--------------------------------------------------------------|---------------------|------|
| exact savings (core on read rows) vs plain PEFT LoRA: LLaMA  | loss, read logits,  | 1e-6 |
|   GQA, sdpa / eager, no / left / right padding, gradient     | grads               |      |
|   checkpointing off / non-reentrant / reentrant              |                     |      |
| the same with channel sparsity, vs exact savings off         | loss, grads         | 1e-6 |
| Ministral (sliding window) sdpa / eager, Gemma 2 (sliding    | loss, read logits,  | 1e-6 |
|   window, attention-logit soft-capping) eager, vs plain LoRA | grads               |      |
| query rows the core computes: last layer, other layers       | row counts          | 0    |
| after `handle.remove()` vs before `apply_sparselora`         | logits              | 0    |

fp32 relative L2 error; "grads" is every LoRA parameter's gradient and the input-embedding
gradient. Each exactness test also checks, through a spy on the model's own sdpa and eager
cores, that the last layer's core really ran on the read rows only (fewer than L), so a
shortcut that silently ran every row would fail.
"""

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
from transformers import (
    AttentionInterface,
    Gemma2Config,
    Gemma2ForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.llama import modeling_llama
from transformers.models.ministral import modeling_ministral

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.engine.attention import READ_ROWS

EXACT = 1e-6
LENGTH = 12
WINDOWED = ["sliding_attention", "full_attention", "sliding_attention"]  # window 4 < 12


@pytest.fixture
def core_rows(monkeypatch) -> list[tuple[int, int]]:
    """(layer, query rows) of every attention-core call from here on: a spy on the sdpa core
    (transformers' registry) and on the LLaMA, Ministral and Gemma 2 eager cores (their model
    files), in place before any handle is applied."""
    calls: list[tuple[int, int]] = []

    def spying(core):
        def spy(module, query, *args, **kwargs):
            calls.append((module.layer_idx, query.shape[2]))
            return core(module, query, *args, **kwargs)

        return spy

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spying(sdpa_attention_forward))
    for model_file in (modeling_llama, modeling_ministral, modeling_gemma2):
        eager = spying(model_file.eager_attention_forward)
        monkeypatch.setattr(model_file, "eager_attention_forward", eager)
    return calls


def read_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position t is read by the loss when label t + 1 is set."""
    read = torch.zeros_like(labels, dtype=torch.bool)
    read[:, :-1] = labels[:, 1:] != -100
    return read


def loss_and_grads(model, batch):
    """Loss, the logits of the read positions (N, V), and the gradients of every trainable
    parameter and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    out.loss.backward()
    logits = out.logits
    if logits.dim() == 3:  # the plain model's (B, L, V); labelled logits are (N, V) already
        logits = logits[read_positions(batch["labels"])]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad.clone()
    return out.loss.detach(), logits.detach(), grads


def assert_same(result, expected) -> None:
    loss, logits, grads = result
    ref_loss, ref_logits, ref_grads = expected
    assert rel_err(loss, ref_loss) < EXACT
    assert rel_err(logits, ref_logits) < EXACT
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name  # a gradient that vanished would compare trivially
        assert rel_err(grad, ref_grads[name]) < EXACT, name


def assert_read_rows_only(calls, batch, last: int) -> None:
    """The last layer's core ran on the positions some row reads, every other on all L."""
    union = int(read_positions(batch["labels"]).any(0).sum())
    assert 0 < union < LENGTH
    assert {rows for layer, rows in calls if layer == last} == {union}
    assert {rows for layer, rows in calls if layer != last} == {LENGTH}


def checkpointed(model, reentrant: bool | None):
    if reentrant is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
    return model


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-ckpt", "ckpt", "reentrant"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_loss_and_gradients_equal_plain_lora(attn_impl, padding, reentrant, core_rows):
    """Rows of 3, 4 and 5 answer tokens, padded by 0, 2 and 4 tokens: the rows read different
    positions, and the core computes their union."""
    model = lora_model(tiny_llama(kv_heads=2, attn_impl=attn_impl), ATTN + MLP)
    model = checkpointed(model, reentrant)
    model.train()
    batch = make_batch(length=LENGTH, padding=padding, seed=11)
    expected = loss_and_grads(model, batch)
    apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    core_rows.clear()
    assert_same(loss_and_grads(model, batch), expected)
    assert_read_rows_only(core_rows, batch, last=2)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_with_channel_sparsity_in_the_last_layer(attn_impl, padding, core_rows):
    """Layer 2 is attention- and FFN-sparse too; the reference has the exact savings off."""

    batch = make_batch(length=LENGTH, padding=padding, seed=7)

    def run(savings: bool):
        model = lora_model(tiny_llama(kv_heads=2, attn_impl=attn_impl), ATTN + MLP)
        fields = {**SPARSE, **({} if savings else CHANNELS_ONLY)}
        handle = apply_sparselora(model, SparseLoRAConfig(**fields), use_cache=False)
        model.train()
        core_rows.clear()
        return loss_and_grads(model, batch), handle

    expected, _ = run(savings=False)
    assert {rows for _, rows in core_rows} == {LENGTH}
    result, handle = run(savings=True)
    assert_same(result, expected)
    assert_read_rows_only(core_rows, batch, last=2)
    assert "k_proj" in handle.last_selection()[2]  # layer 2's attention really is sparse


def ministral(attn_impl: str):
    config = MinistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=4, layer_types=WINDOWED, tie_word_embeddings=False,
        initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config._attn_implementation = attn_impl
    torch.manual_seed(0)
    return MinistralForCausalLM(config).float()


def gemma2(attn_impl: str):
    config = Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        query_pre_attn_scalar=16, initializer_range=0.1, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config._attn_implementation = attn_impl
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).float()


@pytest.mark.parametrize(
    "build, attn_impl",
    [(ministral, "sdpa"), (ministral, "eager"), (gemma2, "eager")],
    ids=["ministral-sdpa", "ministral-eager", "gemma2-eager"],
)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sliding_windows_and_soft_capping(build, attn_impl, padding, core_rows):
    """The last layer is a sliding-window layer (window 4 of 12 tokens); Gemma 2 soft-caps the
    attention logits (cap 2, so the cap matters) and the final logits."""
    model = lora_model(build(attn_impl), ATTN + MLP)
    model.train()
    batch = make_batch(length=LENGTH, padding=padding, seed=5)
    expected = loss_and_grads(model, batch)
    apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    core_rows.clear()
    assert_same(loss_and_grads(model, batch), expected)
    assert_read_rows_only(core_rows, batch, last=2)


def test_every_row_runs_where_the_shortcut_does_not_apply(core_rows):
    """Evaluation, no labels, `handle.dense()`, attention weights requested, attention dropout:
    the last layer's core computes every row (the model's own call)."""
    model = lora_model(tiny_llama(kv_heads=2, attn_impl="eager"), ATTN)
    batch = make_batch(length=LENGTH, padding="right")
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    handle = apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)

    def rows_of_last_layer(**inputs) -> set[int]:
        core_rows.clear()
        model(**inputs)
        return {rows for layer, rows in core_rows if layer == 2}

    model.eval()
    with torch.no_grad():
        assert rows_of_last_layer(**batch) == {LENGTH}
    model.train()
    assert rows_of_last_layer(**unlabelled) == {LENGTH}
    with handle.dense():
        assert rows_of_last_layer(**batch) == {LENGTH}
    core_rows.clear()
    out = model(**batch, output_attentions=True)
    assert out.attentions[2].shape[-2:] == (LENGTH, LENGTH)
    assert {rows for layer, rows in core_rows if layer == 2} == {LENGTH}
    attention = model.get_base_model().model.layers[2].self_attn
    attention.attention_dropout = 0.1
    assert rows_of_last_layer(**batch) == {LENGTH}
    attention.attention_dropout = 0.0
    union = int(read_positions(batch["labels"]).any(0).sum())
    assert rows_of_last_layer(**batch) == {union} != {LENGTH}  # the shortcut itself


def test_only_the_last_attention_module_is_redirected_and_remove_restores_it(core_rows):
    model = lora_model(tiny_llama(kv_heads=2), ATTN)
    base = model.get_base_model()
    layers = base.model.layers
    batch = make_batch(length=LENGTH, padding="left")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits

    seen = []  # (model's implementation, layer's implementation) as each layer starts
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args: seen.append(
                (base.config._attn_implementation, module.self_attn.config._attn_implementation)
            )
        )
        for layer in layers
    ]
    handle = apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    assert all(layer.self_attn.config is base.config for layer in layers[:2])
    assert layers[2].self_attn.config is not base.config
    model.train()
    model(**batch).loss.backward()
    assert seen == [("sdpa", "sdpa"), ("sdpa", "sdpa"), ("sdpa", READ_ROWS)]
    assert base.config._attn_implementation == "sdpa"

    # The core follows the model's implementation at call time.
    base.set_attn_implementation("eager")
    core_rows.clear()
    model(**batch)
    assert_read_rows_only(core_rows, batch, last=2)
    assert layers[2].self_attn.config._attn_implementation == READ_ROWS
    base.set_attn_implementation("sdpa")

    handle.remove()
    for hook in hooks:
        hook.remove()
    assert all(layer.self_attn.config is base.config for layer in layers)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    again = apply_sparselora(model, SparseLoRAConfig(**NO_SPARSITY), use_cache=False)
    assert layers[2].self_attn.config._attn_implementation == READ_ROWS
    again.remove()
    assert layers[2].self_attn.config is base.config


def test_the_saved_core_flops_are_counted_once_per_forward(core_rows):
    """`flops_saved` holds the skipped query rows' QK^T and AV, forward and backward, also
    under reentrant checkpointing (which runs the core twice)."""
    saved = {}
    for skip in (False, True):
        model = checkpointed(lora_model(tiny_llama(kv_heads=2), ATTN + MLP), reentrant=True)
        config = SparseLoRAConfig(**NO_SPARSITY, labelled_logits=False, skip_unread_last_layer=skip)
        handle = apply_sparselora(model, config, use_cache=False)
        model.train()
        batch = make_batch(length=LENGTH, padding="right")
        model(**batch, use_cache=False).loss.backward()
        saved[skip] = handle.stats.flops_saved
    union = int(read_positions(batch["labels"]).any(0).sum())
    # 3 sequences, 4 heads of dim 16, (12 - union) rows against 12 keys, QK^T + AV: forward 1x,
    # backward 2x. The rest of `flops_saved` is the skipped q, o and FFN rows.
    core = 2 * 2 * 3 * 4 * (LENGTH - union) * LENGTH * 16 * 3
    assert saved[False] == 0
    skipped_rows = int((~read_positions(batch["labels"])).sum())
    hidden, ffn, rank = 64, 96, 4
    frozen = (2 * hidden * hidden + 3 * hidden * ffn) * 2  # q, o, FFN: forward + input grad
    lora = (2 * rank * 2 * hidden + 3 * rank * (hidden + ffn)) * 3  # their adapters
    assert saved[True] == core + 2 * (frozen + lora) * skipped_rows
