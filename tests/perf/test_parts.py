"""The parts model on a tiny random LLaMA shape: layer kinds from a preset, the parts really
run sparse, the head's labelled-logits path is exact, and the optimizer part has the full
model's adapters."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_llama

from sparselora.config import SparseLoRAConfig, get_preset
from sparselora.engine.shapes import ModelShape
from sparselora.engine.state import output_positions
from sparselora.perf.common import MeasureConfig, parse_shape
from sparselora.perf.parts import LayerKind, PartsModel, layer_kinds, layer_spec, parts_config

# A 6-layer tiny model: dense 0-1, FFN-only 2, FFN + attention 3-4, dense last layer 5.
SPARSE = {"ffn_sparsity": {"2-4": 0.75}, "attn_sparsity": {"3-4": 0.5}, "estimator_rank": 4}
KINDS = {
    LayerKind(None, None, False): [0, 1],
    LayerKind(0.75, None, False): [2],
    LayerKind(0.75, 0.5, False): [3, 4],
    LayerKind(None, None, True): [5],
}
TINY = ModelShape.from_config(tiny_llama(layers=6).config)


def parts_model(attn_impl="sdpa", fields=SPARSE) -> PartsModel:
    config = MeasureConfig(
        batch_size=2, shapes=["32,8"], lora_rank=4, device="cpu", dtype="float32",
        attn_implementation=attn_impl,
    )  # fmt: skip
    sparse = SparseLoRAConfig(**fields, estimator="svd")
    return PartsModel(config, sparse, TINY, torch.device("cpu"), torch.float32)


def test_kinds_of_llama3_8b_math10k():
    kinds = layer_kinds(get_preset("llama3-8b-math10k"), 32)
    assert list(kinds.items()) == [
        (LayerKind(None, None, False), [0, 1, 2]),
        (LayerKind(0.99, None, False), [*range(3, 14), 20, 24, 30]),
        (LayerKind(0.99, 0.75, False), [*range(14, 20), 21, 22, 23, *range(25, 30)]),
        (LayerKind(None, None, True), [31]),
    ]
    specs = [layer_spec(layers) for layers in kinds.values()]
    assert specs == ["0-2", "3-13,20,24,30", "14-19,21-23,25-29", "31"]
    labels = [kind.label for kind in kinds]
    assert labels == ["dense", "FFN 0.99", "FFN 0.99 + attn 0.75", "dense, last layer"]

    # Without the last-layer saving, layer 31 is an ordinary dense layer.
    no_skip = SparseLoRAConfig.from_preset("llama3-8b-math10k", skip_unread_last_layer=False)
    assert layer_kinds(no_skip, 32)[LayerKind(None, None, False)] == [0, 1, 2, 31]
    assert len(layer_kinds(no_skip, 32)) == 3


def test_parts_config_puts_each_kind_on_its_parts_layer():
    preset = get_preset("llama3-8b-math10k")
    config = parts_config(preset, list(layer_kinds(preset, 32)))
    assert config.layer_sparsity(4) == ({1: 0.99, 2: 0.99}, {2: 0.75})
    assert config.ffn_criterion == preset.ffn_criterion
    assert config.estimator_rank == preset.estimator_rank
    assert config.skip_unread_last_layer and config.labelled_logits


def test_layer_spec():
    assert layer_spec([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert layer_spec([31]) == "31"
    assert layer_spec([]) == ""


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_sparse_parts_run_sparse_and_dense_parts_do_not(attn_impl):
    model = parts_model(attn_impl)
    assert dict(model.kinds) == KINDS
    parts = model.parts(parse_shape("32,8"))
    assert [p.part for p in parts] == ["inputs"] + ["layer"] * 4 + ["lm_head", "optimizer"]
    assert [p.count for p in parts] == [1, 2, 1, 2, 1, 1, 1]
    model.check_sparse_path(parts)  # raises if a sparse part ran dense or a dense one changed

    layer_parts = [p for p in parts if p.part == "layer"]
    with torch.no_grad():
        _, ffn_only = layer_parts[1].forward()
        _, both = layer_parts[2].forward()
    assert set(ffn_only) == {"gate_proj", "up_proj", "down_proj"}
    assert len(ffn_only["gate_proj"]) == 24  # 75% of 96 FFN channels removed
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"} <= set(both)

    # Last layer: positions no loss reads keep only the residual (q, o and FFN skipped); read
    # positions compute what the dense layer computes.
    last = layer_parts[3]
    x = last.x  # (B, L, H)
    with torch.no_grad():
        sparse_out, _ = last.forward()
        with model.handle.dense():
            dense_out, _ = last.forward()
    labels = torch.full((2, 32), -100)
    labels[:, -8:] = 1
    read = output_positions(labels)
    assert torch.equal(sparse_out[~read], x[~read])
    torch.testing.assert_close(sparse_out[read], dense_out[read], rtol=1e-5, atol=1e-5)

    model.handle.disable()  # the sparse parts now run dense: the check must notice
    with pytest.raises(RuntimeError, match="did not run as its kind says"):
        model.check_sparse_path(parts)
    model.remove()


def test_a_sparse_last_layer_skips_its_ffn_and_passes_the_check():
    """FFN sparsity on the last layer (as in the SmolLM2 preset): its context tokens skip the
    FFN, so it chooses no FFN channels, and that is what the check must expect."""
    model = parts_model(fields={"ffn_sparsity": {"4-5": 0.75}, "estimator_rank": 4})
    assert LayerKind(0.75, None, True) in model.kinds
    model.check_sparse_path(model.parts(parse_shape("32,8")))
    model.remove()


def test_head_with_labelled_logits_is_exact():
    """The SparseLoRA head part (labelled positions only) gives the LoRA head's loss and input
    gradient: the part times a saving, not a different computation."""
    model = parts_model()
    labels = torch.full((2, 32), -100)
    labels[:, -8:] = torch.randint(0, 97, (2, 8))
    hidden = torch.randn(2, 32, 64, requires_grad=True)
    losses, grads, head_rows = {}, {}, {}
    head = model.model.lm_head
    for method in ("lora", "sparselora"):
        hidden.grad = None
        hook = head.register_forward_hook(
            lambda module, args, out, method=method: head_rows.update({method: args[0].shape})
        )
        with model.handle.dense() if method == "lora" else contextlib.nullcontext():
            losses[method] = model.head_loss(hidden, labels)
        hook.remove()
        losses[method].backward()
        grads[method] = hidden.grad.clone()
    torch.testing.assert_close(losses["sparselora"], losses["lora"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["sparselora"], grads["lora"], rtol=1e-5, atol=1e-7)
    assert grads["lora"][:, :-9].abs().sum() == 0  # context positions feed no logit
    assert head_rows == {"lora": (2, 32, 64), "sparselora": (2 * 8, 64)}
    model.remove()


def test_optimizer_part_covers_the_full_models_adapters():
    """Rank 4 on q, k, v (64 -> 64, 64 -> 32, 64 -> 32) and o (64 -> 64): 4 x (in + out)
    parameters each, 4 x (128 + 96 + 96 + 128) = 1792 per layer, in all six layers although the
    parts model has four."""
    model = parts_model()
    assert model.lora_parameters == 6 * 1792
    optimizer = model.parts(parse_shape("32,8"))[-1]
    assert optimizer.part == "optimizer" and optimizer.label == "AdamW, 0.0108M LoRA parameters"
    model.remove()
