"""Phi-3 (fused `qkv_proj` and `gate_up_proj`) and Qwen3.5 (Gated DeltaNet linear-attention
layers beside full-attention layers whose `q_proj` interleaves each head's query with its output
gate) against the masked-dense reference, as LLaMA is in test_sparse_equivalence.py: grouped-
query attention, LoRA on the fused modules, FFN and attention sparsity, left and right padding,
non-reentrant gradient checkpointing, exact savings on and off (fp32).

Tolerances (relative L2):

| comparison                                                   | compared              | tol  |
|--------------------------------------------------------------|-----------------------|------|
| sparse vs masked-dense reference (exact savings off / on)    | loss, (read) logits,  | 1e-5 |
|                                                              | every LoRA grad, dx   |      |
| sparsity 1e-9 (every channel kept) vs plain PEFT LoRA        | loss, logits, grads   | 1e-6 |
| after `handle.remove()` vs before `apply_sparselora`         | logits                | 0    |
| sparse vs a reference built on a wrong row layout            | logits or a grad      | >1e-3|

The reference's logits and every gradient must differ from the unmasked model's by more than
1e-2, so a sparse path that silently ran dense would fail. The row layouts below (`Place`) are
this file's own reading of transformers' modeling_phi3.py and modeling_qwen3_5.py, independent
of the library's `Rows`.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    ATTN,
    CHANNELS_ONLY,
    MLP,
    left_padded_batch,
    lora_model,
    make_batch,
    sparse_config,
)
from reference import LLAMA, Place, install_masks, loss_and_grads, rel_err
from torch.utils.flop_counter import FlopCounterMode
from transformers import Phi3Config, Phi3ForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5

from sparselora import ConfigError, apply_sparselora
from sparselora.cli import app as cli
from sparselora.engine.flops import step_flops
from sparselora.engine.models import FAMILIES, Rows
from sparselora.engine.models.phi3 import Phi3Family
from sparselora.engine.shapes import ModelShape

SPARSE = 1e-5
EXACT = 1e-6
REALLY_SPARSE = 1e-2  # the reference's logits and grads move at least this far from dense
WRONG = 1e-3  # a reference on a wrong layout is at least this far from the sparse result
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 4, 2, 16
Q_WIDTH, KV_WIDTH = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
LINEAR, FULL = "linear_attention", "full_attention"

# Phi3MLP: gate, up = gate_up_proj(x).chunk(2); Phi3Attention: qkv_proj rows q | k | v.
PHI3 = {
    "gate_proj": Place("mlp.gate_up_proj", FFN),
    "up_proj": Place("mlp.gate_up_proj", FFN, lambda c: c + FFN),
    "down_proj": Place("mlp.down_proj"),
    "q_proj": Place("self_attn.qkv_proj", Q_WIDTH),
    "k_proj": Place("self_attn.qkv_proj", KV_WIDTH, lambda c: c + Q_WIDTH),
    "v_proj": Place("self_attn.qkv_proj", KV_WIDTH, lambda c: c + Q_WIDTH + KV_WIDTH),
    "o_proj": Place("self_attn.o_proj"),
}
# Qwen3_5Attention: q_proj(x).view(..., heads, 2 * head_dim).chunk(2, -1) = query, gate.
QWEN35 = {
    **LLAMA,
    "q_proj": Place(
        "self_attn.q_proj", Q_WIDTH, lambda c: c // HEAD_DIM * 2 * HEAD_DIM + c % HEAD_DIM
    ),
}
PHI3_LORA = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
QWEN35_LORA = ATTN + MLP + ["in_proj_qkv", "out_proj"]  # and the DeltaNet's own projections

# name: (model_type, layer types (Qwen3.5), FFN layers, attention layers, reference layout)
MODELS = {
    "phi3": ("phi3", None, "0-2", "1-2", PHI3),
    "qwen3_5": ("qwen3_5_text", [LINEAR, FULL, LINEAR, FULL], "0-3", "1,3", QWEN35),
    "qwen3_5-linear-last": ("qwen3_5_text", [FULL, LINEAR, FULL, LINEAR], "0-3", "0,2", QWEN35),
}


def tiny_model(name: str, seed: int = 0):
    """A random grouped-query model of family `name` (hidden 64, FFN 96, 4 heads, 2 KV heads)."""
    model_type, layer_types = MODELS[name][:2]
    sizes = dict(
        vocab_size=97,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "phi3":
        config, model_class = Phi3Config(num_hidden_layers=3, **sizes), Phi3ForCausalLM
    else:
        config = Qwen3_5TextConfig(
            num_hidden_layers=len(layer_types),
            layer_types=layer_types,
            head_dim=HEAD_DIM,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            **sizes,
        )
        model_class = Qwen3_5ForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():  # norms start constant (Qwen3.5's (1 + w) at w = 0); make them matter
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(torch.randn_like(param), alpha=0.1)
    return model


def lora(name: str, seed: int = 0):
    targets = PHI3_LORA if MODELS[name][0] == "phi3" else QWEN35_LORA
    return lora_model(tiny_model(name, seed), targets)


def config(name: str, channels_only: bool = True, **overrides):
    _, _, ffn, attn, _ = MODELS[name]
    fields = {"ffn_sparsity": {ffn: 0.5}, "attn_sparsity": {attn: 0.5}, **overrides}
    return sparse_config(channels_only=channels_only, **fields)


def sparse_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position t is dense only when it predicts a labelled token t + 1."""
    sparse = torch.ones_like(labels, dtype=torch.bool)
    sparse[:, :-1] = labels[:, 1:] == -100
    return sparse


def reference(model, chosen, batch, layout, sparse_lora_branch=False):
    """(loss, logits, grads) of `model` masked as `chosen` says, on `layout`'s rows."""
    hooks = install_masks(
        model, chosen, sparse_positions(batch["labels"]), sparse_lora_branch, layout
    )
    try:
        return loss_and_grads(model, batch)
    finally:
        for hook in hooks:
            hook.remove()


def sparse_and_reference(name, cfg, padding="right", checkpointing=False):
    """(sparse result, masked-dense reference, selection, batch, model)."""
    model = lora(name)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = make_batch(padding=padding)
    dense = loss_and_grads(model, batch)
    handle = apply_sparselora(model, cfg, use_cache=False)
    result = loss_and_grads(model, batch)
    chosen = handle.last_selection()
    handle.remove()
    expected = reference(model, chosen, batch, MODELS[name][4], cfg.sparse_lora_branch)
    assert rel_err(expected[1], dense[1]) > REALLY_SPARSE
    for grad_name, grad in expected[2].items():
        assert rel_err(grad, dense[2][grad_name]) > REALLY_SPARSE, grad_name
    return result, expected, chosen, batch, model


def assert_matches(result, expected, tol=SPARSE, read=None):
    loss, logits, grads = result
    ref_loss, ref_logits, ref_grads = expected
    assert rel_err(loss, ref_loss) < tol
    ref_logits = ref_logits if read is None else ref_logits[read]
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < tol
    assert grads.keys() == ref_grads.keys()
    assert sum("lora_" in grad_name for grad_name in grads) > 0
    for grad_name, grad in grads.items():
        assert rel_err(grad, ref_grads[grad_name]) < tol, grad_name


def assert_differs(result, expected):
    """Some output (logits or a gradient) is at least WRONG away from `expected`."""
    errors = [rel_err(result[1], expected[1])]
    errors += [rel_err(grad, expected[2][n]) for n, grad in result[2].items()]
    assert max(errors) > WRONG


# -- the masked-dense equivalence ------------------------------------------------------------


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", ["phi3", "qwen3_5"])
def test_sparse_matches_masked_dense_reference(name, padding):
    result, expected, chosen, _, model = sparse_and_reference(name, config(name), padding)
    assert_matches(result, expected)
    layers = model.config.num_hidden_layers
    assert [i for i in chosen if "gate_proj" in chosen[i]] == list(range(layers))
    assert all(len(chosen[i]["gate_proj"]) == FFN // 2 for i in chosen)
    attention = [i for i in chosen if "k_proj" in chosen[i]]
    assert attention == ([1, 2] if name == "phi3" else [1, 3])
    assert all(len(chosen[i]["k_proj"]) == KV_WIDTH // 2 for i in attention)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_savings_match_masked_dense_reference(name, padding):
    """Labelled logits and the last layer's unread rows: Phi-3's fused qkv still computes q for
    every token there; a linear-attention last layer (qwen3_5-linear-last) skips only its FFN."""
    cfg = config(name, channels_only=False)
    assert cfg.labelled_logits and cfg.skip_unread_last_layer
    result, expected, _, batch, _ = sparse_and_reference(name, cfg, padding)
    read = ~sparse_positions(batch["labels"])
    assert_matches(result, expected, read=read)


@pytest.mark.parametrize("name", ["phi3", "qwen3_5"])
def test_gradient_checkpointing_matches_masked_dense_reference(name):
    """Non-reentrant checkpointing recomputes each layer with the channels chosen first."""
    cfg = config(name, channels_only=False)
    result, expected, _, batch, _ = sparse_and_reference(name, cfg, "left", checkpointing=True)
    assert_matches(result, expected, read=~sparse_positions(batch["labels"]))


@pytest.mark.parametrize("name", ["phi3", "qwen3_5"])
def test_remove_restores_bit_identical_outputs(name):
    model = lora(name)
    batch = make_batch(padding="left")
    before = model(**batch).logits.detach()
    handle = apply_sparselora(model, config(name), use_cache=False)
    assert not torch.equal(model(**batch).logits, before)
    handle.remove()
    assert torch.equal(model(**batch).logits.detach(), before)


# -- what would fail if these models were handled like LLaMA ----------------------------------


def test_phi3_fused_offsets_are_the_ones_checked():
    """The reference with each projection at its own rows of the fused modules matches; read
    from row 0 as separate LLaMA modules would be (up at gate's rows, k and v at q's), or with
    k and v swapped, it does not. The kept k and v channels differ in every sparse layer, so
    the swap moves the mask."""
    result, expected, chosen, batch, model = sparse_and_reference("phi3", config("phi3"))
    assert_matches(result, expected)
    for i in (1, 2):
        assert not torch.equal(chosen[i]["k_proj"], chosen[i]["v_proj"])
    from_row_0 = Place("self_attn.qkv_proj", KV_WIDTH)
    wrong = {
        "up at gate's rows": {**PHI3, "up_proj": PHI3["gate_proj"]},
        "k, v at q's rows": {**PHI3, "k_proj": from_row_0, "v_proj": from_row_0},
        "k, v swapped": {**PHI3, "k_proj": PHI3["v_proj"], "v_proj": PHI3["k_proj"]},
    }
    for layout in wrong.values():
        assert_differs(result, reference(model, chosen, batch, layout))


def test_phi3_gate_is_the_first_half_of_gate_up(monkeypatch):
    """Phi3MLP applies the activation to the first half of gate_up_proj: a family reading the
    halves the other way round (the activation on up) no longer matches the reference."""

    class SwappedHalves(Phi3Family):
        def block(self, layer, index, config):
            block = super().block(layer, index, config)
            block.gate, block.up = block.up, block.gate
            return block

    result, expected, _, _, _ = sparse_and_reference("phi3", config("phi3"))
    assert_matches(result, expected)
    monkeypatch.setitem(FAMILIES, "phi3", SwappedHalves())
    swapped, swapped_expected, _, _, _ = sparse_and_reference("phi3", config("phi3"))
    assert_differs(swapped, swapped_expected)


def test_phi3_lora_on_fused_modules_is_exact():
    """LoRA adapters on qkv_proj and gate_up_proj (their delta on the full fused width): every
    channel kept reproduces PEFT; with `sparse_lora_branch` the gate_up adapter is sliced to the
    kept gate and up rows, as the reference masks the adapted module's output. (Half kept with
    dense adapters: test_sparse_matches_masked_dense_reference.)"""
    model = lora("phi3")
    batch = make_batch(padding="right")
    peft = loss_and_grads(model, batch)
    nearly_dense = config("phi3", ffn_sparsity=1e-9, attn_sparsity=1e-9)
    handle = apply_sparselora(model, nearly_dense, use_cache=False)
    assert_matches(loss_and_grads(model, batch), peft, tol=EXACT)
    assert len(handle.last_selection()) == 3  # the sparse path ran
    handle.remove()
    cfg = config("phi3", sparse_lora_branch=True)
    result, expected, _, _, _ = sparse_and_reference("phi3", cfg)
    assert_matches(result, expected)


def test_qwen3_5_query_rows_interleave_with_the_output_gate():
    """Kept query channel h*hd + d is q_proj row h*2*hd + d; the gate rows stay dense. Reading
    q_proj as LLaMA would (the first nh*hd rows are the queries) does not match."""
    result, expected, chosen, batch, model = sparse_and_reference("qwen3_5", config("qwen3_5"))
    assert_matches(result, expected)
    contiguous = {**QWEN35, "q_proj": Place("self_attn.q_proj", Q_WIDTH)}
    assert_differs(result, reference(model, chosen, batch, contiguous))
    family = FAMILIES["qwen3_5_text"]
    layer = model.get_base_model().model.layers[1]
    query = family.block(layer, 1, model.config).q
    assert isinstance(query, Rows) and query.width == Q_WIDTH
    assert query.rows_of(torch.tensor([0, 15, 16, 63])).tolist() == [0, 15, 32, 111]


def test_qwen3_5_attention_sparsity_on_a_linear_attention_layer_is_refused():
    model = lora("qwen3_5")
    with pytest.raises(ConfigError, match=r"0 \(linear attention \(Gated DeltaNet\)\)"):
        apply_sparselora(model, config("qwen3_5", attn_sparsity={"0-1": 0.5}), use_cache=False)
    with pytest.raises(ConfigError, match=r"2 \(linear attention"):
        apply_sparselora(model, config("qwen3_5", attn_sparsity={"2": 0.5}), use_cache=False)


def test_qwen3_5_ffn_sparsity_on_linear_attention_layers():
    """FFN sparsity on the DeltaNet layers alone: their FFN runs sparse and matches the
    reference; their mixer (and its LoRA) runs dense, and no attention channels are chosen."""
    cfg = config("qwen3_5", ffn_sparsity={"0,2": 0.5}, attn_sparsity={})
    result, expected, chosen, _, model = sparse_and_reference("qwen3_5", cfg)
    assert_matches(result, expected)
    assert sorted(chosen) == [0, 2]
    assert all(set(chosen[i]) == {"gate_proj", "up_proj", "down_proj"} for i in chosen)
    assert [model.config.layer_types[i] for i in chosen] == [LINEAR, LINEAR]
    assert any("linear_attn.in_proj_qkv.lora_A" in name for name in result[2])


# -- the analytic FLOPs counter ---------------------------------------------------------------


def delta_rule_without_matmuls(query, key, value, g, beta, **kwargs):
    """A stand-in for the Gated DeltaNet core with no matmul (FlopCounterMode counts none)
    that still reads every input, so each DeltaNet projection gets its input gradient."""
    group = value.shape[2] // query.shape[2]  # value heads per key head
    mix = (query * key).sum(-1).repeat_interleave(group, dim=2) + g + beta  # (B, L, nv)
    return value * mix.unsqueeze(-1), None


def conv_without_matmuls(hidden_states, weight, bias=None, activation=None, **kwargs):
    return torch.nn.functional.silu(hidden_states)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("phi3", None),
        ("phi3", {}),
        ("phi3", {"sparse_lora_branch": True, **CHANNELS_ONLY}),
        ("qwen3_5", None),
        ("qwen3_5", {}),
        ("qwen3_5-linear-last", {"sparse_lora_branch": True}),
    ],
)
def test_counter_matches_torch_flop_counter(name, fields, monkeypatch):
    """Eager attention; LoRA on the fused modules (Phi-3) and on the DeltaNet projections
    (Qwen3.5). The counter leaves out the DeltaNet core (causal conv, gated delta rule), whose
    cost is the kernel's: here it is replaced by a matmul-free stand-in, and the analytic count
    must equal FlopCounterMode's exactly."""
    monkeypatch.setattr(
        modeling_qwen3_5, "torch_chunk_gated_delta_rule", delta_rule_without_matmuls
    )
    monkeypatch.setattr(modeling_qwen3_5, "causal_conv1d_fn", conv_without_matmuls)
    model = lora(name)
    model.get_base_model().config._attn_implementation = "eager"
    length, out, pad, batch_size = 12, 4, 3, 2
    batch = left_padded_batch(length, out, pad, batch_size)
    cfg = None
    if fields is not None:
        cfg = config(name, channels_only=False, estimator_rank=4, **fields)
        apply_sparselora(model, cfg, use_cache=False)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(**batch, use_cache=False).loss.backward()  # the stand-in keeps no state
    expected = step_flops(
        ModelShape.from_config(model.config),
        length,
        out,
        batch=batch_size,
        lora_rank=4,
        lora_targets=PHI3_LORA if name == "phi3" else QWEN35_LORA,
        config=cfg,
        pad_tokens=pad,
    )
    assert counter.get_total_flops() == expected["total"]


def test_shapes_from_config_and_the_flops_command(tmp_path, capsys):
    """`sparselora flops --model DIR` reads each family's saved config.json: Phi-3's fused
    modules and Qwen3.5's linear-attention layers; attention sparsity on those is refused."""
    phi3 = ModelShape.from_config(Phi3Config())  # Phi-3-mini's published sizes
    assert phi3.fused and not phi3.linear_layers
    assert phi3.modules(0)["qkv_proj"] == ((3072, 3 * 3072), ("q_proj", "k_proj", "v_proj"))
    assert phi3.modules(0)["gate_up_proj"] == ((3072, 2 * 8192), ("gate_proj", "up_proj"))
    qwen = ModelShape.from_config(Qwen3_5TextConfig())  # every 4th layer full attention
    assert qwen.linear_layers == tuple(i for i in range(32) if i % 4 != 3)
    assert set(qwen.modules(0)) == {
        *("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"),
        *("gate_proj", "up_proj", "down_proj"),
    }
    assert qwen.modules(3)["q_proj"] == ((4096, 2 * 16 * 256), ("q_proj",))  # query + gate
    assert qwen.projections(3)["q_proj"] == (4096, 16 * 256)  # what the estimator factors

    full = ",".join(str(i) for i in range(3, 32, 4))
    for model_config, attn in ((Phi3Config(), "3-30"), (Qwen3_5TextConfig(), full)):
        directory = tmp_path / model_config.model_type
        model_config.save_pretrained(directory)
        spec = tmp_path / f"{model_config.model_type}.json"
        spec.write_text(json.dumps({"ffn_sparsity": {"0-31": 0.5}, "attn_sparsity": {attn: 0.5}}))
        command = ["flops", "--config", str(spec), "--model", str(directory), "--format", "json"]
        assert cli.main(command) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert 1.0 < row["speedup"] < 3.0
    spec.write_text(json.dumps({"attn_sparsity": {"0": 0.5}}))  # a DeltaNet layer
    assert cli.main(["flops", "--config", str(spec), "--model", str(directory)]) != 0
    assert "linear attention (Gated DeltaNet)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["phi3", "qwen3_5"])
def test_whitened_estimator_fits_each_projection_and_is_cached(name, tmp_path):
    """Factors for every logical projection (its rows of a fused or interleaved module), fitted
    on calibration batches, cached under the model's fingerprint and reused as they are."""
    cfg = config(name, estimator="whitened_svd")
    calibration = [make_batch(batch=4, length=24, seed=7)]
    batch = make_batch(padding="left")
    first = apply_sparselora(lora(name), cfg, calibration=calibration, cache_dir=tmp_path)
    widths = {"gate_proj": FFN, "up_proj": FFN, "q_proj": Q_WIDTH, "k_proj": KV_WIDTH}
    for (_, proj), (a, b) in first.estimator.factors.items():
        assert a.shape[0] == HIDDEN and b.shape[1] == widths.get(proj, KV_WIDTH), proj
    assert {p for _, p in first.estimator.factors} == {*widths, "v_proj"}
    first.model(**batch)
    model = lora(name)  # the same weights: the cached factors are found, not refitted
    second = apply_sparselora(model, cfg, cache_dir=tmp_path, reuse_calibration=True)
    assert second.ready and second.fingerprint == first.fingerprint
    model(**batch)
    chosen = first.last_selection()
    assert any("q_proj" in kept for kept in chosen.values())
    assert chosen.keys() == second.last_selection().keys()
    for i, kept in chosen.items():
        for proj, channels in kept.items():
            assert torch.equal(channels, second.last_selection()[i][proj]), (i, proj)
