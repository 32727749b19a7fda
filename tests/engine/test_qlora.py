"""QLoRA: SparseLoRA on bitsandbytes 4-bit frozen weights (nf4, fp4; with and without double
quantization of the block scales), PEFT LoRA on top, float32 compute.

The tiny LLaMA's projections are swapped for `bnb.nn.Linear4bit` and quantized on the CPU
(hidden 64: q/k/v/gate/up rows are one 64-value block each; down reads 96 = 1.5 blocks per row,
so its rows straddle blocks and take the fallback path).

Tolerances (relative L2), as tests/engine/test_sparse_equivalence.py:

| comparison                                              | tol       | why                     |
|---------------------------------------------------------|-----------|-------------------------|
| dequantized rows / columns vs dequantize_4bit + select  | bit exact | same kernel, same bytes |
| sparsity ~0 vs PEFT QLoRA                               | 1e-6      | same math, other shapes |
| sparse vs masked-dense reference on the same 4-bit model| 1e-5      | fp32 summation order    |
| float model holding the dequantized weights vs 4-bit    | 1e-5      | same function           |
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ATTN, MLP, lora_model, make_batch, sparse_config, tiny_llama
from reference import assert_close, install_masks, loss_and_grads, rel_err

from sparselora import apply_sparselora
from sparselora.engine import ops, quant

with warnings.catch_warnings():  # bitsandbytes warns that its optional `kernels` package is absent
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

EXACT = 1e-6
SPARSE = 1e-5
FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_4bit(linear: torch.nn.Linear, quant_type: str, double: bool, compute_dtype=torch.float32):
    """A Linear4bit holding `linear`'s weight and bias, quantized (on the CPU, by .to)."""
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double,
        quant_type=quant_type,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)


def qlora_model(quant_type: str, double: bool, targets=ATTN + MLP, bias: bool = False):
    """The tiny LLaMA with every projection in 4-bit, wrapped in PEFT LoRA (its bnb layers)."""
    model = tiny_llama(bias=bias)
    for layer in model.model.layers:
        for name in PROJECTIONS:
            parent = layer.mlp if name in MLP else layer.self_attn
            setattr(parent, name, to_4bit(getattr(parent, name), quant_type, double))
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb LoRA layer by it
    return lora_model(model, targets)


def dequantized_float_model(qlora, targets=ATTN + MLP, bias: bool = False):
    """The same tiny LLaMA in float, holding the 4-bit model's dequantized weights."""
    model = lora_model(tiny_llama(bias=bias), targets)
    theirs = dict(qlora.named_parameters())
    for name, param in model.named_parameters():
        if theirs[name].dtype != torch.uint8:  # LoRA, norms, embeddings, biases
            param.data.copy_(theirs[name])
    pairs = zip(model.modules(), qlora.modules(), strict=True)
    for mine, quantized in pairs:
        if quant.is_4bit(quantized):
            mine.weight.data.copy_(quant.dequantize(quantized))
    return model


def sparse_tokens_of(batch) -> torch.Tensor:
    """Position t is dense when it predicts a labelled token t + 1 (the default token split)."""
    labelled = batch["labels"] != -100
    sparse = torch.ones_like(labelled)
    sparse[:, :-1] = ~labelled[:, 1:]
    return sparse


@pytest.mark.parametrize("in_features", [128, 96])  # two whole blocks a row; 1.5 (fallback)
@pytest.mark.parametrize("quant_type,double", FORMATS)
def test_dequantized_parts_are_exact(quant_type, double, in_features, monkeypatch):
    torch.manual_seed(0)
    layer = to_4bit(torch.nn.Linear(in_features, 160), quant_type, double)
    full = dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (160, in)
    assert torch.equal(quant.dequantize(layer), full)
    rows = torch.randperm(160)[:37].sort().values
    cols = torch.randperm(in_features)[:29].sort().values
    if in_features % 64 == 0:  # whole-block rows must not dequantize the whole weight
        monkeypatch.setattr(quant, "dequantize", lambda layer: pytest.fail("full dequantize"))
    assert torch.equal(quant.dequantize_rows(layer, rows), full.index_select(0, rows))
    weight = quant.Weight4bit(layer)
    assert torch.equal(weight.kept(0, rows, torch.float32), full.index_select(0, rows))
    monkeypatch.undo()
    assert torch.equal(weight.kept(1, cols, torch.float32), full.index_select(1, cols))
    assert torch.equal(weight.kept(1, cols, torch.bfloat16), full.index_select(1, cols).bfloat16())


@pytest.mark.parametrize("quant_type,double", FORMATS)
def test_sparse_qlora_matches_masked_dense_reference(quant_type, double):
    model = qlora_model(quant_type, double)
    batch = make_batch(padding="left")
    dense = loss_and_grads(model, batch)
    handle = apply_sparselora(model, sparse_config(), use_cache=False)
    result = loss_and_grads(model, batch)
    chosen = handle.last_selection()
    assert sorted(chosen) == [0, 1, 2] and "q_proj" in chosen[1]
    handle.remove()

    hooks = install_masks(model, chosen, sparse_tokens_of(batch))
    expected = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    assert rel_err(expected[1], dense[1]) > 1e-4  # the reference is really sparse
    assert_close(result, expected, SPARSE)


def test_near_zero_sparsity_matches_peft_qlora():
    model = qlora_model("nf4", True)
    batch = make_batch(padding="right")
    expected = loss_and_grads(model, batch)
    handle = apply_sparselora(
        model, sparse_config(ffn_sparsity=1e-9, attn_sparsity=1e-9), use_cache=False
    )
    result = loss_and_grads(model, batch)
    assert len(handle.last_selection()) == 3  # the sparse path really ran
    assert_close(result, expected, EXACT)


def test_bias_and_bf16_compute_follow_linear4bit():
    """A Linear4bit with a bias and bf16 compute dtype under a float32 model: the sparse path
    casts in and out as the layer's own forward does (checked at ~0 sparsity, bf16 rounding)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 128, bias=True)
    torch.nn.init.normal_(linear.bias)
    layer = to_4bit(linear, "nf4", True, compute_dtype=torch.bfloat16)
    x = torch.randn(10, 64, requires_grad=True)
    rows = torch.arange(0, 128, 2)
    expected = layer(x)[:, rows]
    expected.square().sum().backward()
    expected_grad, x.grad = x.grad, None
    got = ops.rows_linear(x, quant.Weight4bit(layer), layer.bias, rows)
    got.square().sum().backward()
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-2 and rel_err(x.grad, expected_grad) < 1e-2
    assert rel_err(got, linear(x)[:, rows]) > 1e-4  # it really is the quantized weight


def test_estimator_and_fingerprint_see_dequantized_weights():
    """The estimator's factors and the weights fingerprint of a 4-bit model are those of the
    float model holding its dequantized weights, and both models' sparse steps agree."""
    qlora = qlora_model("fp4", True)
    float_model = dequantized_float_model(qlora)
    batch = make_batch()
    config = sparse_config()
    handle = apply_sparselora(qlora, config, use_cache=False)
    float_handle = apply_sparselora(float_model, config, use_cache=False)
    assert handle.fingerprint == float_handle.fingerprint
    factors, float_factors = handle.estimator.factors, float_handle.estimator.factors
    assert factors.keys() == float_factors.keys()
    for key, (a, b) in factors.items():
        assert torch.equal(a, float_factors[key][0]) and torch.equal(b, float_factors[key][1])
    result = loss_and_grads(qlora, batch)
    expected = loss_and_grads(float_model, batch)
    assert handle.last_selection().keys() == float_handle.last_selection().keys()
    for layer, chosen in handle.last_selection().items():
        for name, keep in chosen.items():
            assert torch.equal(keep, float_handle.last_selection()[layer][name])
    loss, logits, grads = result
    assert rel_err(loss, expected[0]) < SPARSE and rel_err(logits, expected[1]) < SPARSE
    for name, grad in grads.items():
        assert rel_err(grad, expected[2][name]) < SPARSE, name


def test_remove_restores_qlora_model():
    model = qlora_model("nf4", False)
    batch = make_batch()
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    expected = loss_and_grads(model, batch)
    handle = apply_sparselora(model, sparse_config(), use_cache=False)
    assert rel_err(loss_and_grads(model, batch)[1], expected[1]) > 1e-4  # sparse differs
    handle.remove()
    after = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = loss_and_grads(model, batch)
    assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])


def test_other_quantized_base_layers_are_refused():
    model = tiny_llama()
    layer = model.model.layers[0].mlp
    layer.gate_proj = bnb.nn.Linear8bitLt(64, 96, bias=False, has_fp16_weights=False)
    with pytest.raises(TypeError, match="bitsandbytes 4-bit Linear4bit"):
        apply_sparselora(lora_model(model, ATTN), sparse_config(), use_cache=False)
