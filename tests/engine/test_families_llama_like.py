"""The families registered on LLaMA's layout (engine/models/llama.py, granite.py): Qwen3, SmolLM3,
OLMo 2, OLMo 3, Granite, Ministral and Ministral 3, with the proof LLaMA has, plus one test per
family's own detail.

Each tiny model is random: 3 layers, hidden 64, 4 query heads on 2 KV heads of dim 16, weights
of std 0.1 (at transformers' default 0.02 attention is nearly uniform and the details below
barely move the logits), every bias the config offers (normal, std 0.5), the family's detail
switched on (a NoPE layer, sliding windows of 4 tokens on a 12-token batch, Granite's
multipliers, Ministral 3's query scale); each detail moves the logits by more than 1e-2.

Tolerances (relative L2, fp32):

| comparison                                                    | compared               | tol  |
|---------------------------------------------------------------|------------------------|------|
| sparse, exact savings off, vs masked-dense reference          | loss, logits, grads    | 1e-5 |
| sparse, exact savings on, vs masked-dense reference           | loss, read logits,     | 1e-5 |
|   (also with non-reentrant gradient checkpointing)            | grads                  |      |
| after `handle.remove()` vs before `apply_sparselora`          | logits                 | 0    |
| analytic `step_flops` vs `FlopCounterMode` on a real step     | total FLOPs            | 0    |
| Granite labelled-logits loss vs GraniteForCausalLM's own loss | loss, read logits      | 1e-6 |

"grads" is every LoRA parameter's gradient and the input-embedding gradient. The reference's
logits and every gradient must differ from the unmasked model's by more than 1e-2, so a sparse
path that silently ran dense would fail.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ATTN,
    CHANNELS_ONLY,
    MLP,
    left_padded_batch,
    lora_model,
    make_batch,
    measured_step,
    sparse_config,
)
from reference import install_masks, loss_and_grads, rel_err
from transformers import (
    GraniteConfig,
    GraniteForCausalLM,
    Ministral3Config,
    Ministral3ForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.cli.app import main
from sparselora.engine.flops import step_flops
from sparselora.engine.models import family_for
from sparselora.engine.models.granite import GraniteFamily
from sparselora.engine.models.llama import LlamaFamily
from sparselora.engine.peft_compat import base_linear
from sparselora.engine.shapes import ModelShape

SPARSE = 1e-5
REALLY_SPARSE = 1e-2  # the reference's logits and grads move at least this far from dense
LAYERS = 3
KV_HEADS = 2
HEAD_DIM = 16  # hidden 64 / 4 heads
QK = ("q_proj", "k_proj")
WINDOWED = ["sliding_attention", "full_attention", "sliding_attention"]  # window 4 < 12 tokens
# Ministral 3's query scale 1 + beta * log(1 + floor(position / original_max)) varies over 12
# tokens only with a small original_max (the YaRN factor must then be 128 / 4).
MINISTRAL3_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 1e6,
    "factor": 32.0,
    "original_max_position_embeddings": 4,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.5,
}

# model_type -> (config class, causal LM class, the config fields beyond LLaMA's it sets)
FAMILIES = {
    # q_norm / k_norm per head, on the head dim
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=HEAD_DIM, attention_bias=True)),
    # layer 1 without RoPE (no_rope_layers[i] == 0)
    "smollm3": (
        SmolLM3Config,
        SmolLM3ForCausalLM,
        dict(no_rope_layers=[1, 0, 1], attention_bias=True, mlp_bias=True),
    ),
    # q_norm / k_norm over the whole projection width; norms after attention and MLP
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, dict(attention_bias=True)),
    "olmo3": (
        Olmo3Config,
        Olmo3ForCausalLM,
        dict(attention_bias=True, sliding_window=4, layer_types=WINDOWED),
    ),
    # embedding, residual and attention multipliers; logits divided by logits_scaling
    "granite": (
        GraniteConfig,
        GraniteForCausalLM,
        dict(
            attention_bias=True,
            mlp_bias=True,
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=4.0,
        ),
    ),
    "ministral": (
        MinistralConfig,
        MinistralForCausalLM,
        dict(head_dim=HEAD_DIM, sliding_window=4, layer_types=WINDOWED),
    ),
    # position-dependent query scale (llama_4_scaling_beta)
    "ministral3": (
        Ministral3Config,
        Ministral3ForCausalLM,
        dict(head_dim=HEAD_DIM, rope_parameters=MINISTRAL3_ROPE),
    ),
}
# What switches each family's detail off, to show the tiny model exercises it.
DETAIL_OFF = {
    "smollm3": [dict(no_rope_layers=[1, 1, 1])],
    "olmo3": [dict(layer_types=["full_attention"] * LAYERS)],
    "ministral": [dict(layer_types=["full_attention"] * LAYERS)],
    "granite": [
        dict(embedding_multiplier=1.0),
        dict(residual_multiplier=1.0),
        dict(attention_multiplier=HEAD_DIM**-0.5),
        dict(logits_scaling=1.0),
    ],
    "ministral3": [dict(rope_parameters={**MINISTRAL3_ROPE, "llama_4_scaling_beta": 0.0})],
}


def tiny_config(family: str, attn_impl: str = "sdpa", **overrides):
    config_class, _, fields = FAMILIES[family]
    config = config_class(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        initializer_range=0.1,  # 5x the default: attention far from uniform
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **{**fields, **overrides},
    )
    config._attn_implementation = attn_impl
    return config


def tiny_model(family: str, attn_impl: str = "sdpa", seed: int = 0, **overrides):
    """A random 3-layer grouped-query model of `family`, its biases made non-zero."""
    config = tiny_config(family, attn_impl, **overrides)
    torch.manual_seed(seed)
    model = FAMILIES[family][1](config)
    for name, param in model.named_parameters():
        if name.endswith("bias"):  # random init leaves biases at zero; make them matter
            torch.nn.init.normal_(param, std=0.5)
    return model.float()


def sparse_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position t is dense only when it predicts a labelled token t + 1."""
    sparse = torch.ones_like(labels, dtype=torch.bool)
    sparse[:, :-1] = labels[:, 1:] == -100
    return sparse


def decoder_layers(peft_model):
    return peft_model.get_base_model().model.layers


def run_sparse(model, batch, cfg: SparseLoRAConfig, checkpointing: bool = False):
    """(loss, logits, grads) of the sparse model and the channels it kept; the model is left
    as it was (SparseLoRA removed, checkpointing off)."""
    handle = apply_sparselora(model, cfg, use_cache=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    mlp_calls = []  # a pre-hook: recomputation stops inside the MLP once backward has its inputs
    counter = decoder_layers(model)[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    result = loss_and_grads(model, batch)
    counter.remove()
    assert len(mlp_calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer
    if checkpointing:
        model.gradient_checkpointing_disable()
    chosen = handle.last_selection()
    handle.remove()
    return result, chosen


def masked_reference(model, batch, chosen):
    hooks = install_masks(model, chosen, sparse_positions(batch["labels"]))
    expected = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    return expected


def assert_really_sparse(expected, dense):
    assert rel_err(expected[1], dense[1]) > REALLY_SPARSE
    for name, grad in expected[2].items():
        assert rel_err(grad, dense[2][name]) > REALLY_SPARSE, name


def assert_grads_close(grads, ref_grads, tol):
    assert grads.keys() == ref_grads.keys()
    assert sum("lora_" in name for name in grads) == 2 * 7 * LAYERS  # A and B, 7 targets
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < tol, name


def test_registry_places_each_family():
    for model_type in ("qwen3", "smollm3", "olmo2", "olmo3", "ministral", "ministral3"):
        assert type(family_for(model_type)) is LlamaFamily, model_type
    assert type(family_for("granite")) is GraniteFamily
    assert FAMILIES.keys() <= {"granite", *LlamaFamily.model_types}


# -- equal to the masked-dense reference -----------------------------------------------------

MODES = {
    "channels_only": (CHANNELS_ONLY, False),
    "exact_savings": ({}, False),
    "checkpointing": ({}, True),  # exact savings on, non-reentrant gradient checkpointing
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_matches_masked_dense_reference(family, padding, mode):
    overrides, checkpointing = MODES[mode]
    cfg = sparse_config(channels_only=False, **overrides)
    model = lora_model(tiny_model(family), ATTN + MLP)
    batch = make_batch(padding=padding)
    dense = loss_and_grads(model, batch)

    (loss, logits, grads), chosen = run_sparse(model, batch, cfg, checkpointing)
    assert sorted(chosen) == list(range(LAYERS))
    # the last layer skips the FFN of every unread (sparse) position when that saving is on
    ffn_layers = range(LAYERS - 1) if cfg.skip_unread_last_layer else range(LAYERS)
    assert [i for i in chosen if "gate_proj" in chosen[i]] == list(ffn_layers)
    assert all(len(chosen[i]["gate_proj"]) == 48 for i in ffn_layers)  # half of 96
    assert all(len(chosen[i]["k_proj"]) == KV_HEADS * HEAD_DIM // 2 for i in (1, 2))

    ref_loss, ref_logits, ref_grads = expected = masked_reference(model, batch, chosen)
    assert_really_sparse(expected, dense)
    assert rel_err(loss, ref_loss) < SPARSE
    if cfg.labelled_logits:
        read = ~sparse_positions(batch["labels"])
        assert logits.shape == (int(read.sum()), 97)  # only the positions the loss reads
        ref_logits = ref_logits[read]
    assert rel_err(logits, ref_logits) < SPARSE
    assert_grads_close(grads, ref_grads, SPARSE)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remove_restores_bit_identical_outputs(family):
    model = lora_model(tiny_model(family), ATTN + MLP)
    batch = make_batch(padding="left")
    before = model(**batch).logits.detach()
    handle = apply_sparselora(model, sparse_config(), use_cache=False)
    assert not torch.equal(model(**batch).logits, before)
    handle.remove()
    assert torch.equal(model(**batch).logits.detach(), before)


# -- each family's own detail ----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(DETAIL_OFF))
def test_tiny_model_exercises_its_detail(family):
    """Switching the family's detail off changes the logits: the reference checks above ran
    through it (NoPE layer, sliding windows, Granite's multipliers, Ministral 3's query scale)."""
    batch = make_batch(padding="left")
    logits = tiny_model(family)(**batch).logits
    for off in DETAIL_OFF[family]:
        assert rel_err(tiny_model(family, **off)(**batch).logits, logits) > REALLY_SPARSE, off


@pytest.mark.parametrize("layer", [1, 2], ids=["nope", "rope"])
def test_smollm3_sparse_attention_on_nope_and_rope_layers(layer):
    model = lora_model(tiny_model("smollm3"), ATTN + MLP)
    uses_rope = [decoder_layers(model)[i].self_attn.use_rope for i in range(LAYERS)]
    assert uses_rope == [1, 0, 1]
    batch = make_batch(padding="left")
    cfg = sparse_config(ffn_sparsity={}, attn_sparsity={str(layer): 0.5})
    (loss, logits, grads), chosen = run_sparse(model, batch, cfg)
    assert sorted(chosen) == [layer]
    ref_loss, ref_logits, ref_grads = masked_reference(model, batch, chosen)
    assert rel_err(loss, ref_loss) < SPARSE
    assert rel_err(logits, ref_logits) < SPARSE
    assert_grads_close(grads, ref_grads, SPARSE)


def mask_after_qk_norms(model, chosen, sparse_tokens):
    """The wrong reference: q and k masked at their norms' outputs instead of the projections'
    (v and o as usual). Returns the hook handles."""
    layers = decoder_layers(model)
    widths = {name: base_linear(getattr(layers[0].self_attn, name)).out_features for name in QK}
    every_qk = {name: torch.arange(width) for name, width in widths.items()}
    hooks = install_masks(model, {i: {**c, **every_qk} for i, c in chosen.items()}, sparse_tokens)
    dense = (~sparse_tokens).float().unsqueeze(-1)  # (B, L, 1)
    for i, c in chosen.items():
        attn = layers[i].self_attn
        for name, norm in zip(QK, (attn.q_norm, attn.k_norm), strict=True):
            kept = torch.zeros(widths[name])
            kept[c[name]] = 1.0
            mask = dense + (1.0 - dense) * kept  # (B, L, width)
            hooks.append(
                norm.register_forward_hook(lambda m, a, y, mask=mask: y * mask.view(y.shape))
            )
    return hooks


@pytest.mark.parametrize("family", ["olmo2", "olmo3", "qwen3"])
def test_qk_norm_runs_on_the_zero_filled_projection(family):
    """OLMo 2/3 normalise q and k over the whole projection width, Qwen3 per head. The sparse
    path and the reference mask the projection before the norm, so the norm's RMS includes the
    zeros; masking after the norm (RMS over every channel) gives another model. No LoRA on q/k,
    so the two references differ by the norm alone."""
    model = lora_model(tiny_model(family), ["v_proj", "o_proj"] + MLP)
    norm_width = decoder_layers(model)[0].self_attn.q_norm.weight.numel()
    assert norm_width == (4 * HEAD_DIM if family.startswith("olmo") else HEAD_DIM)
    batch = make_batch(padding="right")
    cfg = sparse_config(ffn_sparsity={}, attn_sparsity={"0-2": 0.5})
    (loss, logits, grads), chosen = run_sparse(model, batch, cfg)

    ref_loss, ref_logits, ref_grads = masked_reference(model, batch, chosen)
    assert rel_err(loss, ref_loss) < SPARSE
    assert rel_err(logits, ref_logits) < SPARSE
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < SPARSE, name

    hooks = mask_after_qk_norms(model, chosen, sparse_positions(batch["labels"]))
    _, after_logits, after_grads = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    assert rel_err(after_logits, ref_logits) > REALLY_SPARSE
    assert rel_err(after_grads["inputs_embeds"], ref_grads["inputs_embeds"]) > REALLY_SPARSE


def test_granite_labelled_logits_divide_by_logits_scaling():
    """The labelled-logits head returns GraniteForCausalLM's own loss and logits, which divide
    the LM head's output by logits_scaling; the undivided logits give another loss."""
    model = lora_model(tiny_model("granite"), ATTN + MLP)
    assert model.config.logits_scaling == 4.0
    batch = make_batch(padding="right")
    own = model(**batch)
    read = ~sparse_positions(batch["labels"])
    targets = batch["labels"][:, 1:][read[:, :-1]]
    undivided = F.cross_entropy(own.logits[read] * model.config.logits_scaling, targets)
    assert rel_err(undivided, own.loss) > REALLY_SPARSE

    handle = apply_sparselora(model, SparseLoRAConfig(estimator="svd"), use_cache=False)
    out = model(**batch)
    assert out.logits.shape == (int(read.sum()), 97)  # the labelled-logits path ran
    assert rel_err(out.loss, own.loss) < 1e-6
    assert rel_err(out.logits, own.logits[read]) < 1e-6
    handle.remove()


def test_mixture_of_experts_is_refused_clearly():
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"):
        with pytest.raises(NotImplementedError, match="mixture-of-experts.*supported: .*'qwen3'"):
            family_for(model_type)
    with pytest.raises(NotImplementedError, match="'gpt2' yet; supported") as dense:
        family_for("gpt2")
    assert "mixture" not in str(dense.value)

    config = MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
    )
    model = lora_model(MixtralForCausalLM(config), ATTN)
    with pytest.raises(NotImplementedError, match="'mixtral': mixture-of-experts"):
        apply_sparselora(model, sparse_config(), use_cache=False)


# -- the analytic FLOPs counter ----------------------------------------------------------------

FLOPS_CONFIG = SparseLoRAConfig(
    ffn_sparsity={"0-1": 0.5},
    attn_sparsity={"0": 0.5, "2": 0.25},
    estimator="svd",
    estimator_rank=4,
)


@pytest.mark.parametrize("method", ["lora", "sparselora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counter_matches_torch_flop_counter(family, method):
    """As for LLaMA in test_flops.py: eager attention makes every matmul visible to
    FlopCounterMode; the analytic count of the same step must equal it exactly."""
    model = lora_model(tiny_model(family, attn_impl="eager"), ATTN)
    length, out, pad, batch_size = 12, 4, 3, 2
    batch = left_padded_batch(length, out, pad, batch_size)
    config = FLOPS_CONFIG if method == "sparselora" else None
    if config is not None:
        apply_sparselora(model, config, use_cache=False)
    model.train()
    shape = ModelShape.from_config(model.config)
    assert (shape.num_kv_heads, shape.head_dim) == (KV_HEADS, HEAD_DIM)
    expected = step_flops(
        shape,
        length,
        out,
        batch=batch_size,
        lora_rank=4,
        lora_targets=ATTN,
        config=config,
        pad_tokens=pad,
    )
    assert measured_step(model, batch) == expected["total"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flops_command_reads_the_family_config_json(family, tmp_path, capsys):
    config = tiny_config(family)
    config.save_pretrained(tmp_path / "model")
    FLOPS_CONFIG.save(tmp_path / "sparselora.json")
    argv = [
        "flops",
        "--model",
        str(tmp_path / "model"),
        "--config",
        str(tmp_path / "sparselora.json"),
    ]
    assert main([*argv, "--seq-len", "12", "--out-tokens", "4", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    shape = ModelShape(64, 96, LAYERS, 4, KV_HEADS, HEAD_DIM, 97)
    assert ModelShape.from_config(config) == shape
    assert row["sparselora"] == step_flops(shape, 12, 4, config=FLOPS_CONFIG)
    assert row["lora"] == step_flops(shape, 12, 4)
