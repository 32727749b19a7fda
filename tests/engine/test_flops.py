"""The analytic FLOPs counter: hand-computed values, PyTorch's own count of the real step,
and sanity on the paper's presets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import (
    ATTN,
    CHANNELS_ONLY,
    MLP,
    left_padded_batch,
    lora_model,
    measured_step,
    tiny_llama,
)
from transformers import LlamaConfig

from sparselora import PRESETS, SparseLoRAConfig, apply_sparselora, get_preset
from sparselora.engine.flops import COMPONENTS, compare, flops_table, preset_task, step_flops
from sparselora.engine.shapes import PAPER_MODELS, TASK_SHAPES, ModelShape, load_shape

# H=8, I=16, 2 layers, 2 query heads sharing 1 KV head (G=2) of dim 4, vocabulary 10.
TINY = ModelShape(
    hidden=8, intermediate=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=10
)
# One sequence of 6 tokens, the last 2 labelled: T=6 tokens, 2 dense, 4 sparse; LoRA r=2.
TINY_STEP = dict(seq_len=6, out_tokens=2, batch=1, lora_rank=2)


def tiny_config(**overrides) -> SparseLoRAConfig:
    """Attention of layer 0 and FFN of layer 1 at sparsity 0.5, rank-2 estimator; the exact
    savings off (counted in their own test)."""
    fields = dict(
        ffn_sparsity={"1": 0.5}, attn_sparsity={"0": 0.5}, estimator_rank=2, **CHANNELS_ONLY
    )
    fields.update(overrides)
    return SparseLoRAConfig(**fields)


def test_lora_step_by_hand():
    flops = step_flops(TINY, **TINY_STEP)
    # Frozen q (8->8), k (8->4), v (8->4), o (8->8) on T=6 tokens: 2*T*in*out each.
    attn_forward = 2 * 6 * 8 * 8 + 2 * 6 * 8 * 4 + 2 * 6 * 8 * 4 + 2 * 6 * 8 * 8  # 2304
    # Layer 0: q/k/v read the frozen embedding, so only o needs an input gradient (1x forward).
    layer0_attn = attn_forward + 2 * 6 * 8 * 8
    layer1_attn = attn_forward + attn_forward
    assert flops["attn_proj"] == layer0_attn + layer1_attn == 7680
    # gate (8->16), up (8->16), down (16->8): forward + input gradient in both layers.
    mlp_forward = 3 * (2 * 6 * 8 * 16)  # 4608
    assert flops["mlp_proj"] == 2 * (mlp_forward + mlp_forward) == 18432
    # QK^T and AV over the full 6x6 scores, 2 heads of dim 4; backward 2x forward.
    core_forward = 2 * (2 * 2 * 6 * 6 * 4)  # 1152 per layer
    assert flops["attn_core"] == 2 * (core_forward + 2 * core_forward) == 6912
    # LoRA r=2: forward 2*T*r*(in+out); backward dB + dh (2*T*r*out each), dA (2*T*r*in),
    # dx (2*T*r*in) where the input needs a gradient (not q/k/v of layer 0).
    lora_forward = 2 * 6 * 2 * (8 + 8) + 2 * (2 * 6 * 2 * (8 + 4)) + 2 * 6 * 2 * (8 + 8)  # 1344
    q0 = 2 * (2 * 6 * 2 * 8) + 2 * 6 * 2 * 8  # 576
    kv0 = 2 * (2 * 6 * 2 * 4) + 2 * 6 * 2 * 8  # 384 each
    o0 = 2 * (2 * 6 * 2 * (8 + 8))  # 768
    layer0_lora = lora_forward + q0 + kv0 + kv0 + o0
    layer1_lora = lora_forward + 2 * lora_forward
    assert flops["lora"] == layer0_lora + layer1_lora == 7488
    # LM head 8 -> 10 on every position, forward and input gradient.
    assert flops["lm_head"] == 2 * (2 * 6 * 8 * 10) == 1920
    assert flops["estimator"] == 0
    assert flops["total"] == 7680 + 18432 + 6912 + 7488 + 1920 == 42432


def test_sparselora_step_by_hand():
    flops = step_flops(TINY, **TINY_STEP, config=tiny_config())
    # Layer 0 attention at 0.5: k_qk = k_v = int(4 * 0.5) = 2 KV channels, so q keeps 2*G = 4
    # of 8 rows, k keeps 2 of 4, v keeps 2 of 4, o reads 4 of 8 columns on the 4 sparse tokens;
    # the 2 labelled tokens run dense.
    dense = 2 * 2 * 8 * 8 + 2 * 2 * 8 * 4 + 2 * 2 * 8 * 4 + 2 * 2 * 8 * 8  # 768
    sparse = 2 * 4 * 8 * 4 + 2 * 4 * 8 * 2 + 2 * 4 * 8 * 2 + 2 * 4 * 4 * 8  # 768
    o_backward = 2 * 2 * 8 * 8 + 2 * 4 * 4 * 8  # only o needs the input gradient in layer 0
    layer1_attn = 2 * 2304
    assert flops["attn_proj"] == dense + sparse + o_backward + layer1_attn == 6656
    # Layer 1 FFN at 0.5: k = 8 of 16 channels for gate/up rows and down columns.
    layer0_mlp = 2 * 4608
    layer1_mlp = 2 * (3 * (2 * 2 * 8 * 16) + 3 * (2 * 4 * 8 * 8))  # dense + sparse tokens, 2x
    assert flops["mlp_proj"] == layer0_mlp + layer1_mlp == 15360
    # Attention core, LoRA (dense branch) and LM head are those of LoRA.
    assert (flops["attn_core"], flops["lora"], flops["lm_head"]) == (6912, 7488, 1920)
    # Estimator, rank 2, per_token on all 6 tokens: gate and up 2*T*r*(H+I) in layer 1,
    # q, k, v 2*T*r*(H+out) in layer 0.
    ffn_estimator = 2 * (2 * 6 * 2 * (8 + 16))  # 1152
    attn_estimator = 2 * 6 * 2 * (8 + 8) + 2 * (2 * 6 * 2 * (8 + 4))  # 960
    assert flops["estimator"] == ffn_estimator + attn_estimator == 2112
    assert flops["total"] == 6656 + 15360 + 6912 + 7488 + 1920 + 2112 == 40448
    assert compare(TINY, 6, 2, tiny_config(), lora_rank=2)["speedup"] == 42432 / 40448


def test_exact_savings_by_hand():
    """Labelled logits and the last layer's skipped context tokens, on the step above."""
    flops = step_flops(TINY, **TINY_STEP, config=tiny_config(labelled_logits=True))
    # Positions 3 and 4 predict the labelled tokens 4 and 5: the LM head runs on 2 of 6.
    assert flops["lm_head"] == 2 * (2 * 2 * 8 * 10) == 640
    assert flops["total"] == 40448 - 1920 + 640

    flops = step_flops(TINY, **TINY_STEP, config=tiny_config(skip_unread_last_layer=True))
    # Layer 1 is the last: q and o run on the 2 read positions, k and v on all 6 tokens.
    layer1_attn = 2 * (2 * 2 * 8 * 8 + 2 * 2 * 8 * 8) + 2 * (2 * 6 * 8 * 4 + 2 * 6 * 8 * 4)
    assert flops["attn_proj"] == 2048 + layer1_attn == 4608
    # Its FFN runs on the 2 read positions, dense; no context token is left to be sparse.
    assert flops["mlp_proj"] == 2 * 4608 + 2 * (3 * (2 * 2 * 8 * 16)) == 12288
    # LoRA of q and o on 2 tokens (fwd 2*n*r*(in+out), bwd dB+dh+dA+dx), k and v on 6.
    q1 = o1 = 2 * 2 * 2 * 16 + 2 * (2 * 2 * 2 * 8) + 2 * (2 * 2 * 2 * 8)  # 384
    k1 = v1 = 2 * 6 * 2 * 12 + 2 * 6 * 2 * (2 * 4 + 8) + 2 * 6 * 2 * 8  # 864
    assert flops["lora"] == 3456 + q1 + o1 + k1 + v1 == 5952
    # So layer 1 chooses no FFN channels: only layer 0's attention estimator remains.
    assert flops["estimator"] == 960
    # Layer 1's attention core computes the 2 read query rows against all 6 keys (layer 0:
    # all 6 rows); forward + 2x backward in both.
    core0, core1 = 2 * (2 * 2 * 6 * 6 * 4), 2 * (2 * 2 * 2 * 6 * 4)  # 1152, 384
    assert flops["attn_core"] == 3 * core0 + 3 * core1 == 4608
    assert flops["total"] == 4608 + 12288 + 4608 + 5952 + 1920 + 960


@pytest.mark.parametrize(
    "criteria, estimator",
    [
        # seq_mean: gate and up on the B=1 sequence mean; attention still on 6 tokens (960).
        ({"ffn_criterion": "seq_mean"}, 2 * (2 * 1 * 2 * (8 + 16)) + 960),
        # oracle FFN: the true gate and up on 6 tokens.
        ({"ffn_criterion": "oracle"}, 2 * (2 * 6 * 8 * 16) + 960),
        # oracle attention: the true q, k, v on 6 tokens.
        ({"attn_criterion": "oracle"}, 1152 + 2 * 6 * 8 * 8 + 2 * (2 * 6 * 8 * 4)),
        ({"ffn_criterion": "random", "attn_criterion": "random"}, 0),
    ],
)
def test_estimator_criteria_by_hand(criteria, estimator):
    flops = step_flops(TINY, **TINY_STEP, config=tiny_config(**criteria))
    assert flops["estimator"] == estimator
    assert flops["total"] - flops["estimator"] == 40448 - 2112


def test_grad_to_embeddings_adds_layer0_qkv_input_gradients():
    lora = step_flops(TINY, **TINY_STEP, grad_to_embeddings=True)
    sparse = step_flops(TINY, **TINY_STEP, config=tiny_config(), grad_to_embeddings=True)
    lora_dx = 3 * (2 * 6 * 2 * 8)  # dx of the q, k, v adapters of layer 0
    assert lora["attn_proj"] == 7680 + (2 * 6 * 8 * 8 + 2 * (2 * 6 * 8 * 4))
    assert lora["lora"] == sparse["lora"] == 7488 + lora_dx
    # Sparse layer 0: q/k/v input gradients on the dense and the sparse tokens.
    qkv0 = 2 * 2 * 8 * 8 + 2 * (2 * 2 * 8 * 4) + 2 * 4 * 8 * 4 + 2 * (2 * 4 * 8 * 2)
    assert sparse["attn_proj"] == 6656 + qkv0


def test_logits_on_output_only_changes_only_the_lm_head():
    for config in (None, tiny_config()):
        full = step_flops(TINY, **TINY_STEP, config=config)
        short = step_flops(TINY, **TINY_STEP, config=config, logits_on_output_only=True)
        assert short["lm_head"] == 2 * (2 * 2 * 8 * 10)  # the 2 positions predicting labels
        for name in COMPONENTS:
            if name != "lm_head":
                assert short[name] == full[name], name
        assert short["total"] == full["total"] - (1920 - 640)


def test_no_config_equals_zero_sparsity():
    shape = PAPER_MODELS["meta-llama/Meta-Llama-3-8B-Instruct"]
    lora = step_flops(shape, 512, 128)
    assert step_flops(shape, 512, 128, config=SparseLoRAConfig(**CHANNELS_ONLY)) == lora
    zero = SparseLoRAConfig(ffn_sparsity=0.0, attn_sparsity={"3-30": 0.0}, **CHANNELS_ONLY)
    assert step_flops(shape, 512, 128, config=zero) == lora
    # The exact savings alone: LM head on the 128 read positions, last layer's q/o/FFN too,
    # and the last of the 32 layers' attention core on 128 of 512 query rows.
    savings = step_flops(shape, 512, 128, config=SparseLoRAConfig())
    assert savings["lm_head"] == lora["lm_head"] * 128 / 512
    assert savings["attn_core"] == lora["attn_core"] * (31 + 128 / 512) / 32
    assert savings["total"] < lora["total"]


def test_more_sparsity_or_fewer_labelled_tokens_means_fewer_flops():
    shape = PAPER_MODELS["meta-llama/Meta-Llama-3-8B-Instruct"]
    levels = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99)
    for field in ("ffn_sparsity", "attn_sparsity"):
        totals = [
            step_flops(shape, 512, 128, config=SparseLoRAConfig(**{field: {"3-30": s}}))["total"]
            for s in levels
        ]
        assert all(a > b for a, b in zip(totals, totals[1:], strict=False)), field
    config = dataclasses.replace(get_preset("llama3-8b-math10k"), **CHANNELS_ONLY)
    totals = [step_flops(shape, 512, out, config=config)["total"] for out in (3, 128, 512)]
    assert totals[0] < totals[1] < totals[2]
    # Every token labelled: only the last position (it predicts nothing) is left sparse.
    assert abs(totals[2] / step_flops(shape, 512, 512)["total"] - 1) < 0.01


def test_paper_presets_predict_plausible_speedups():
    rows = {row["preset"]: row for row in flops_table()}
    assert set(rows) == set(PRESETS)
    math = rows["llama3-8b-math10k"]
    assert (math["seq_len"], math["out_tokens"]) == TASK_SHAPES["math"]
    assert 1.5 < math["speedup"] < 3.5  # the paper reports up to 2.2x fewer FLOPs
    for row in rows.values():
        assert 1.0 < row["speedup"] < 3.5, row["preset"]
        sparse = row["sparselora"]
        assert sparse["estimator"] < 0.01 * sparse["total"]  # the paper: about 0.05%


def test_every_preset_has_its_model_and_task():
    for name, preset in PRESETS.items():
        assert PAPER_MODELS[preset.model].num_layers == preset.num_layers, name
        assert preset_task(name) in TASK_SHAPES
    assert len(flops_table(tasks=list(TASK_SHAPES))) == 4 * len(PRESETS)


def test_shape_from_transformers_config_and_config_json(tmp_path):
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    smollm2 = PAPER_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert ModelShape.from_config(config) == smollm2
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert load_shape(str(tmp_path)) == smollm2
    assert load_shape("smollm2-135m") == smollm2
    no_kv = ModelShape.from_config({**config.to_dict(), "num_key_value_heads": None})
    assert (no_kv.num_kv_heads, no_kv.head_dim) == (9, 64)
    with pytest.raises(ValueError, match="neither a known model"):
        load_shape(str(tmp_path / "missing"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="out_tokens"):
        step_flops(TINY, 6, 7)
    with pytest.raises(ValueError, match="lora_targets"):
        step_flops(TINY, 6, 2, lora_targets=("qkv",))


# -- the counter against PyTorch's count of the real SparseLoRA step ------------------------

CROSS_CHECK = {
    "lora": None,
    "per_token": {},
    "seq_mean": {"ffn_criterion": "seq_mean"},
    "oracle": {"ffn_criterion": "oracle", "attn_criterion": "oracle"},
    "random": {"ffn_criterion": "random", "attn_criterion": "random"},
    "detach_sparse_base": {"detach_sparse_base": True},
    "sparse_outputs": {"output_tokens": "sparse"},
    "reference_alignment": {"output_tokens": "dense_labelled"},
    "no_exact_savings": CHANNELS_ONLY,
}


@pytest.mark.parametrize(
    "case, kv_heads",
    [("lora", 2), ("per_token", 2), ("per_token", 4)] + [(case, 1) for case in CROSS_CHECK],
)
def test_counter_matches_torch_flop_counter(case, kv_heads):
    """Eager attention computes the full L x L scores, so every matmul is visible to
    FlopCounterMode; the analytic count must equal it exactly."""
    model = lora_model(tiny_llama(kv_heads=kv_heads, attn_impl="eager"), targets=ATTN)
    length, out, pad, batch_size = 12, 4, 3, 2
    batch = left_padded_batch(length, out, pad, batch_size)

    config = None
    if CROSS_CHECK[case] is not None:
        config = SparseLoRAConfig(
            ffn_sparsity={"0-1": 0.5},
            attn_sparsity={"0": 0.5, "2": 0.25},
            estimator="svd",
            estimator_rank=4,
            **CROSS_CHECK[case],
        )
        apply_sparselora(model, config, use_cache=False)
    model.train()
    expected = step_flops(
        ModelShape.from_config(model.config),
        length,
        out,
        batch=batch_size,
        lora_rank=4,
        lora_targets=ATTN,
        config=config,
        pad_tokens=pad,
    )
    assert measured_step(model, batch) == expected["total"]


@pytest.mark.parametrize("sparse_lora_branch", [False, True])
@pytest.mark.parametrize("grad_to_embeddings", [False, True])
def test_counter_matches_torch_with_mlp_adapters(sparse_lora_branch, grad_to_embeddings):
    """LoRA on gate/up/down only: layer 0's attention needs no gradient at all unless the
    embedding output requires one; the optional sparse LoRA branch slices the FFN adapters."""
    model = lora_model(tiny_llama(attn_impl="eager"), targets=MLP)
    if grad_to_embeddings:
        model.enable_input_require_grads()  # what gradient checkpointing sets up
    config = SparseLoRAConfig(
        ffn_sparsity={"0-1": 0.5},
        attn_sparsity={"2": 0.5},
        estimator="svd",
        estimator_rank=4,
        sparse_lora_branch=sparse_lora_branch,
    )
    apply_sparselora(model, config, use_cache=False)
    model.train()
    input_ids = torch.randint(3, 97, (2, 10))
    labels = torch.full((2, 10), -100)
    labels[:, -3:] = input_ids[:, -3:]
    expected = step_flops(
        ModelShape.from_config(model.config),
        10,
        3,
        batch=2,
        lora_rank=4,
        lora_targets=MLP,
        config=config,
        grad_to_embeddings=grad_to_embeddings,
    )
    assert measured_step(model, {"input_ids": input_ids, "labels": labels}) == expected["total"]
