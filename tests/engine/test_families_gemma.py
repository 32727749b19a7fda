"""Gemma 2, Gemma 3 and Gemma 4 (text) against the masked-dense reference, as LLaMA is in
test_sparse_equivalence.py, plus one test per Gemma detail that LLaMA's handling would get wrong.

The tiny models: vocabulary 97, hidden 64, 4 query heads of dim 24 (not 64 / 4) over 2 KV heads,
sliding window 4 on a 12-token batch, final logit soft-capping at 3 with an LM head large enough
for it to bite; Gemma 2 also soft-caps attention logits (2, eager attention: sdpa refuses it).
Gemma 4: layers sliding / full / sliding / full, full-attention head dim 32, per-layer inputs of
width 8, and the last layer reuses layer 1's keys and values with a double-wide (192) MLP.

Tolerances (relative L2, fp32):

| comparison                                                  | compared            | tol  |
|-------------------------------------------------------------|---------------------|------|
| sparse, exact savings off, vs masked-dense reference        | loss, logits, grads | 1e-5 |
| sparse, exact savings on, vs masked-dense reference         | loss, read logits,  | 1e-5 |
| (also under non-reentrant gradient checkpointing)           | grads               |      |
| labelled logits, no sparsity, vs the model's own forward    | loss, read logits   | 1e-6 |
| after `handle.remove()` vs before `apply_sparselora`        | logits              | 0    |
| analytic FLOPs vs FlopCounterMode                           | total FLOPs         | 0    |

"grads" is every LoRA parameter's gradient and the input-embedding gradient. The reference's
logits and every gradient differ from the unmasked model's by more than 1e-2, so a sparse path
that silently ran dense would fail; the teeth tests show that a SiLU FFN or a dropped final
soft-capping miss their reference by far more than the tolerance.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    ATTN,
    CHANNELS_ONLY,
    MLP,
    left_padded_batch,
    lora_model,
    make_batch,
    measured_step,
)
from reference import install_masks, loss_and_grads, rel_err
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    SiglipVisionConfig,
)
from transformers.activations import GELUTanh

from sparselora import ConfigError, SparseLoRAConfig, apply_sparselora
from sparselora.cli.app import main
from sparselora.engine.flops import compare, step_flops
from sparselora.engine.models import family_for
from sparselora.engine.models.gemma import GemmaFamily, gemma_block
from sparselora.engine.savings import labelled_loss
from sparselora.engine.shapes import ModelShape
from sparselora.engine.state import output_positions

SPARSE = 1e-5
EXACT = 1e-6
REALLY_SPARSE = 1e-2  # the reference's logits and grads move at least this far from dense
FINAL_CAP = 3.0
SLIDING, FULL = "sliding_attention", "full_attention"
COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=128,
    sliding_window=4,
    final_logit_softcapping=FINAL_CAP,
    tie_word_embeddings=False,
    pad_token_id=0,
)
FAMILIES = ("gemma2", "gemma3_text", "gemma4_text")
# Per layer: FFN width and KV width (KV heads x head dim; None: keys and values not its own).
WIDTHS = {
    "gemma2": ([96, 96, 96], [48, 48, 48]),
    "gemma3_text": ([96, 96, 96], [48, 48, 48]),
    "gemma4_text": ([96, 96, 96, 192], [48, 64, 48, None]),
}


def text_config(family: str, **overrides):
    if family == "gemma2":
        fields = dict(num_hidden_layers=3, attn_logit_softcapping=2.0, query_pre_attn_scalar=24)
        return Gemma2Config(**{**COMMON, **fields, **overrides})
    if family == "gemma3_text":
        fields = dict(num_hidden_layers=3, layer_types=[SLIDING, FULL, SLIDING])
        return Gemma3TextConfig(**{**COMMON, **fields, "query_pre_attn_scalar": 24, **overrides})
    fields = dict(
        num_hidden_layers=4,
        layer_types=[SLIDING, FULL, SLIDING, FULL],
        global_head_dim=32,
        num_kv_shared_layers=1,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=97,
    )
    return Gemma4TextConfig(**{**COMMON, **fields, **overrides})


MODEL_CLASSES = {
    "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma4_text": Gemma4ForCausalLM,
}


def scaled(model):
    """Random init leaves logits and attention scores too small for soft-capping to matter:
    scale the LM head and the query / key weights up (fp32)."""
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            torch.nn.init.normal_(param, std=0.3)
        if name == "lm_head.weight":
            torch.nn.init.normal_(param, std=0.5)
    return model.float()


def tiny_model(family: str, attn: str | None = None, seed: int = 0, **overrides):
    config = text_config(family, **overrides)
    config._attn_implementation = attn or ("eager" if family == "gemma2" else "sdpa")
    torch.manual_seed(seed)
    return scaled(MODEL_CLASSES[family](config))


def tiny_multimodal(seed: int = 0):
    """Gemma3ForConditionalGeneration around the Gemma 3 text model above, tiny SigLIP tower."""
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    config = Gemma3Config(
        text_config=text_config("gemma3_text").to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return scaled(Gemma3ForConditionalGeneration(config))


def gemma_sparse_config(num_layers: int, savings: bool, attn_layers: str = "0-2", **overrides):
    fields = dict(
        ffn_sparsity={f"0-{num_layers - 1}": 0.5},
        attn_sparsity={attn_layers: 0.5},
        estimator="svd",
        ffn_criterion="per_token",
        start_step=0.0,
        **({} if savings else CHANNELS_ONLY),
    )
    return SparseLoRAConfig(**{**fields, **overrides})


def sparse_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position t is dense only when it predicts a labelled token t + 1."""
    return ~output_positions(labels)


def run_against_reference(model, cfg, batch, layers=None, checkpointing=False):
    """(sparse result, masked-dense reference, selection), each result (loss, logits, grads)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    dense = loss_and_grads(model, batch)
    handle = apply_sparselora(model, cfg, use_cache=False)
    result = loss_and_grads(model, batch)
    chosen = handle.last_selection()
    handle.remove()
    hooks = install_masks(model, chosen, sparse_positions(batch["labels"]), layers=layers)
    expected = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    assert rel_err(expected[1], dense[1]) > REALLY_SPARSE
    for name, grad in expected[2].items():
        assert rel_err(grad, dense[2][name]) > REALLY_SPARSE, name
    return result, expected, chosen


def assert_close(result, expected, read=None):
    """Loss, logits (at the read positions if given) and every gradient within SPARSE."""
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = result, expected
    assert rel_err(loss, ref_loss) < SPARSE
    if read is not None:
        assert logits.shape == (int(read.sum()), 97)  # only the positions the loss reads
        ref_logits = ref_logits[read]
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < SPARSE
    assert grads.keys() == ref_grads.keys()
    assert any("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < SPARSE, name


def assert_widths(family: str, chosen, ffn_layers, attn_layers):
    """Half of each layer's own FFN width and KV width was kept (head dim 24 or 32, not 16)."""
    ffn, kv = WIDTHS[family]
    assert [i for i in chosen if "gate_proj" in chosen[i]] == list(ffn_layers)
    assert [i for i in chosen if "k_proj" in chosen[i]] == list(attn_layers)
    for i in ffn_layers:
        assert len(chosen[i]["gate_proj"]) == ffn[i] // 2, i
    for i in attn_layers:
        assert len(chosen[i]["k_proj"]) == len(chosen[i]["v_proj"]) == kv[i] // 2, i
        assert len(chosen[i]["q_proj"]) == len(chosen[i]["o_proj"]) == 2 * kv[i] // 2, i


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_matches_masked_dense_reference(family, padding):
    model = lora_model(tiny_model(family), ATTN + MLP)
    layers = len(WIDTHS[family][0])
    cfg = gemma_sparse_config(layers, savings=False)
    result, expected, chosen = run_against_reference(model, cfg, make_batch(padding=padding))
    assert_close(result, expected)
    assert_widths(family, chosen, range(layers), range(3))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_savings_match_masked_dense_reference(family, padding):
    """Labelled logits (soft-capped by the family's finalize) and the last layer's skipped
    context tokens; the logits are the model's own at the read positions."""
    model = lora_model(tiny_model(family), ATTN + MLP)
    layers = len(WIDTHS[family][0])
    batch = make_batch(padding=padding)
    cfg = gemma_sparse_config(layers, savings=True)
    result, expected, chosen = run_against_reference(model, cfg, batch)
    assert_close(result, expected, read=output_positions(batch["labels"]))
    # The last layer's FFN runs on read positions only, dense: no channels chosen.
    assert_widths(family, chosen, range(layers - 1), range(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_matches_masked_dense_reference(family):
    """Non-reentrant checkpointing recomputes each layer (Gemma 4: also the shared keys and
    values) with the channels chosen in the first pass."""
    model = lora_model(tiny_model(family), ATTN + MLP)
    batch = make_batch(padding="left")
    calls = []
    mlp = model.get_base_model().model.layers[0].mlp
    hook = mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    cfg = gemma_sparse_config(len(WIDTHS[family][0]), savings=True)
    result, expected, _ = run_against_reference(model, cfg, batch, checkpointing=True)
    hook.remove()
    assert len(calls) == 2 * 3  # dense, sparse, reference: each forward, then recomputed
    assert_close(result, expected, read=output_positions(batch["labels"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_outputs(family):
    model = lora_model(tiny_model(family), ATTN + MLP)
    batch = make_batch(padding="left")
    before = model(**batch).logits.detach()
    handle = apply_sparselora(model, gemma_sparse_config(3, savings=False), use_cache=False)
    assert not torch.equal(model(**batch).logits, before)
    handle.remove()
    assert torch.equal(model(**batch).logits.detach(), before)


def test_gemma3_multimodal_wrapper_runs_its_text_model_sparse():
    """model_type "gemma3": the decoder layers of `model.model.language_model`; LoRA on the
    text model only (the vision tower does not run on text)."""
    text_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = lora_model(tiny_multimodal(), text_targets)
    layers = model.get_base_model().model.language_model.layers
    batch = make_batch(padding="left")
    before = model(**batch).logits.detach()
    cfg = gemma_sparse_config(3, savings=True)
    result, expected, chosen = run_against_reference(model, cfg, batch, layers=layers)
    assert_close(result, expected, read=output_positions(batch["labels"]))
    assert_widths("gemma3_text", chosen, range(2), range(3))
    assert torch.equal(model(**batch).logits.detach(), before)  # removed


# -- what LLaMA's handling would get wrong ---------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_labelled_logits_apply_final_softcapping(family):
    """The labelled-logits loss and logits are the model's own with final_logit_softcapping;
    the same head without the family's finalize misses the loss by far."""
    model = lora_model(tiny_model(family), ATTN + MLP)
    model.train()
    batch = make_batch(padding="right")
    own = model(**batch)
    read = output_positions(batch["labels"])
    assert own.logits.abs().max() < FINAL_CAP  # capped
    no_sparsity = SparseLoRAConfig(ffn_sparsity={}, attn_sparsity={})
    apply_sparselora(model, no_sparsity, use_cache=False)
    out = model(**batch)
    assert out.logits.shape == (int(read.sum()), 97)  # the labelled-logits path ran
    assert rel_err(out.loss, own.loss) < EXACT
    assert rel_err(out.logits, own.logits[read]) < EXACT

    base = model.get_base_model()
    parts = family_for(family).causal_lm_parts(base)
    assert parts.finalize is not None
    with torch.no_grad():
        hidden = parts.decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        capped, _, _ = labelled_loss(hidden, batch["labels"], parts.head, None, parts.finalize)
        uncapped, _, _ = labelled_loss(hidden, batch["labels"], parts.head)
    assert rel_err(capped, own.loss) < EXACT
    assert rel_err(uncapped, own.loss) > 0.1
    uncapped_model = tiny_model(family, final_logit_softcapping=None)
    assert family_for(family).causal_lm_parts(uncapped_model).finalize is None


def test_ffn_uses_the_models_gelu_tanh(monkeypatch):
    """GeGLU: the block's activation is the layer's own gelu_pytorch_tanh. The masked-dense
    check has teeth: the same sparse FFN with LLaMA's SiLU misses the reference by far."""
    model = lora_model(tiny_model("gemma2"), ATTN + MLP)
    layer = model.get_base_model().model.layers[0]
    block = gemma_block(layer, 0)
    assert block.act is layer.mlp.act_fn and isinstance(block.act, GELUTanh)

    def silu_block(self, layer, index, config):
        return dataclasses.replace(gemma_block(layer, index), act=F.silu)

    monkeypatch.setattr(GemmaFamily, "block", silu_block)
    cfg = gemma_sparse_config(3, savings=False, attn_sparsity={})
    (_, logits, grads), (_, ref_logits, ref_grads), _ = run_against_reference(
        model, cfg, make_batch(padding="left")
    )
    assert rel_err(logits, ref_logits) > 1e-2
    assert max(rel_err(grad, ref_grads[name]) for name, grad in grads.items()) > 1e-2


def test_gemma4_kv_shared_layer_refuses_attention_sparsity():
    """Layer 3 reuses layer 1's keys and values: attention sparsity there is a clear error;
    its FFN (double-wide) is sparse in the reference tests above."""
    model = lora_model(tiny_model("gemma4_text"), ATTN + MLP)
    with pytest.raises(ConfigError, match=r"3 \(reuses the keys and values of an earlier layer"):
        apply_sparselora(model, gemma_sparse_config(4, savings=False, attn_layers="2-3"))
    with pytest.raises(ValueError, match=r"attn_sparsity names layer\(s\) \[3\]"):
        step_flops(
            ModelShape.from_config(model.config), 12, 4, config=gemma_sparse_config(4, True, "3")
        )


def test_gemma4_keys_as_values_layers_refuse_attention_sparsity_and_run_ffn_sparse():
    """attention_k_eq_v: full-attention layers take their values from k_proj (no v_proj).
    Attention sparsity there is refused; FFN sparsity on every layer and attention sparsity
    on the sliding layers match the reference."""
    model = lora_model(
        tiny_model("gemma4_text", attention_k_eq_v=True, num_global_key_value_heads=1),
        ATTN + MLP,
    )
    assert model.get_base_model().model.layers[1].self_attn.v_proj is None
    with pytest.raises(ConfigError, match=r"1 \(its values are its keys"):
        apply_sparselora(model, gemma_sparse_config(4, savings=False, attn_layers="0-1"))
    cfg = gemma_sparse_config(4, savings=False, attn_sparsity={"0": 0.5, "2": 0.5})
    result, expected, chosen = run_against_reference(model, cfg, make_batch(padding="right"))
    assert_close(result, expected)
    assert_widths("gemma4_text", chosen, range(4), (0, 2))


def test_gemma4_double_wide_mlp_is_sparsified_with_its_own_width():
    """Layer 3 (KV-shared) has a 192-wide MLP; a quarter of its own width is kept, and its
    sparse FFN matches the reference. A KV-shared layer's context tokens feed no later keys or
    values, so they change the logits at unread positions only: the check is on all logits."""
    model = lora_model(tiny_model("gemma4_text"), MLP)
    layers = model.get_base_model().model.layers
    assert [layer.mlp.gate_proj.base_layer.out_features for layer in layers] == [96, 96, 96, 192]
    batch = make_batch(padding="left")
    cfg = gemma_sparse_config(4, savings=False, ffn_sparsity={"3": 0.75}, attn_sparsity={})
    model.train()
    with torch.no_grad():
        dense = model(**batch).logits
        handle = apply_sparselora(model, cfg, use_cache=False)
        logits = model(**batch).logits
        chosen = handle.last_selection()
        handle.remove()
        hooks = install_masks(model, chosen, sparse_positions(batch["labels"]))
        expected = model(**batch).logits
    for hook in hooks:
        hook.remove()
    assert list(chosen) == [3] and len(chosen[3]["down_proj"]) == 48  # a quarter of 192
    assert rel_err(logits, expected) < SPARSE
    assert rel_err(expected, dense) > REALLY_SPARSE
    read = output_positions(batch["labels"])
    # Read positions are dense tokens: equal to the dense model's up to float rounding (their
    # FFN GEMMs run as (W x^T)^T, `ops.frozen_linear`), far below what sparsity changes.
    assert rel_err(logits[read], dense[read]) < 1e-6


def test_gemma4_mixture_of_experts_is_refused():
    config = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    model = lora_model(tiny_model("gemma4_text", **config), ATTN)
    with pytest.raises(NotImplementedError, match="mixture-of-experts block"):
        apply_sparselora(model, gemma_sparse_config(4, savings=False, attn_layers="0"))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelShape.from_config(model.config)


# -- the FLOPs counter -------------------------------------------------------------------------

FLOPS_CASES = {
    "lora": (None, ATTN, False),
    "sparse": ({}, ATTN, False),
    "channels_only": (CHANNELS_ONLY, ATTN, False),
    "mlp_adapters_grad_to_embeddings": ({}, ATTN + MLP, True),
}


@pytest.mark.parametrize(
    "family, case",
    [(family, case) for family in ("gemma2", "gemma3_text") for case in ("lora", "sparse")]
    + [("gemma4_text", case) for case in sorted(FLOPS_CASES)]
    + [("gemma4_text_k_eq_v", case) for case in ("sparse", "mlp_adapters_grad_to_embeddings")],
)
def test_counter_matches_torch_flop_counter(family, case):
    """Eager attention: every matmul is visible to FlopCounterMode. Gemma 4's per-layer head
    dims, KV-shared and keys-as-values layers, double-wide MLP and per-layer input projections
    are counted; the analytic count equals PyTorch's exactly."""
    overrides, targets, grad_to_embeddings = FLOPS_CASES[case]
    if family == "gemma4_text_k_eq_v":
        kwargs = dict(attention_k_eq_v=True, num_global_key_value_heads=1)
        model = tiny_model("gemma4_text", attn="eager", **kwargs)
    else:
        model = tiny_model(family, attn="eager")
    model = lora_model(model, targets)
    if grad_to_embeddings:
        model.enable_input_require_grads()  # what gradient checkpointing sets up
    config = None
    if overrides is not None:
        last = model.config.num_hidden_layers - 1
        config = SparseLoRAConfig(
            ffn_sparsity={"0-1": 0.5, str(last): 0.25},
            attn_sparsity={"0": 0.5, "2": 0.25},
            estimator="svd",
            estimator_rank=4,
            **overrides,
        )
        apply_sparselora(model, config, use_cache=False)
    model.train()
    length, out, pad, batch_size = 12, 4, 3, 2
    generator = torch.Generator().manual_seed(3)
    batch = left_padded_batch(length, out, pad, batch_size, generator)
    expected = step_flops(
        ModelShape.from_config(model.config),
        length,
        out,
        batch=batch_size,
        lora_rank=4,
        lora_targets=targets,
        config=config,
        pad_tokens=pad,
        grad_to_embeddings=grad_to_embeddings,
    )
    assert measured_step(model, batch) == expected["total"]


@pytest.mark.parametrize("family", FAMILIES + ("gemma3",))
def test_flops_cli_accepts_the_saved_config(family, tmp_path, capsys):
    model = tiny_multimodal() if family == "gemma3" else tiny_model(family)
    model.config.save_pretrained(tmp_path / "model")
    sparse = SparseLoRAConfig(ffn_sparsity={"0-2": 0.5}, attn_sparsity={"0": 0.5})
    (tmp_path / "sparse.yaml").write_text(
        yaml.safe_dump({"ffn_sparsity": {"0-2": 0.5}, "attn_sparsity": {"0": 0.5}})
    )
    argv = ["flops", "--config", str(tmp_path / "sparse.yaml"), "--model", str(tmp_path / "model")]
    assert main([*argv, "--seq-len", "12", "--out-tokens", "4", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    expected = compare(ModelShape.from_config(model.config), 12, 4, sparse)
    assert row["sparselora"] == expected["sparselora"] and row["lora"] == expected["lora"]
    assert row["speedup"] > 1.0
