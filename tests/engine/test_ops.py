"""Sliced frozen linears: exact input gradients, no saved weight copies, safe scratch reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparselora.engine import ops
from sparselora.engine.ops import cols_linear, frozen_linear, rows_linear, stacked_rows_linear


def reference(x, weight, bias, index, dim):
    kept_bias = bias.index_select(0, index) if (bias is not None and dim == 0) else bias
    return F.linear(x, weight.index_select(dim, index), kept_bias)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sliced_linear_matches_plain_autograd(dim, with_bias):
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 10), torch.randn(12) if with_bias else None
    index = torch.tensor([1, 4, 5, 9])
    x = torch.randn(7, 10 if dim == 0 else 4, requires_grad=True)
    fn = rows_linear if dim == 0 else cols_linear
    y = fn(x, weight, bias, index)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref, weight, bias, index, dim)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_no_row_slice_of_the_weight_is_saved_for_backward():
    weight = torch.randn(64, 32)
    index = torch.arange(0, 64, 2)
    x = torch.randn(5, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rows_linear(x, weight, None, index)
    shapes = [tuple(t.shape) for t in saved]
    assert (32, 32) not in shapes and shapes  # the indices and the weight itself, not a copy
    assert all(t.data_ptr() == weight.data_ptr() for t in saved if t.dim() == 2)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cols_linear(torch.randn(5, 32, requires_grad=True), weight.T, None, index)
    assert [tuple(t.shape) for t in saved] == [(32, 32)]  # the column slice, gathered once


@pytest.mark.parametrize("biases", [(False, False), (True, False), (True, True)])
def test_stacked_rows_equal_one_rows_linear_per_weight(biases):
    """gate and up in one GEMM: each part's columns and the input gradient equal the separate
    sliced linears, with different kept rows per weight and biases on none, one or both."""
    torch.manual_seed(3)
    weights = [torch.randn(24, 10), torch.randn(18, 10)]
    bs = [torch.randn(w.shape[0]) if b else None for w, b in zip(weights, biases, strict=True)]
    rows = [torch.tensor([0, 5, 7, 23]), torch.tensor([1, 2, 17])]
    x = torch.randn(6, 10, requires_grad=True)
    y = stacked_rows_linear(x, tuple(zip(weights, bs, rows, strict=True)))
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().clone().requires_grad_(True)
    parts = [reference(x_ref, w, b, r, 0) for w, b, r in zip(weights, bs, rows, strict=True)]
    y_ref = torch.cat(parts, dim=1)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    assert y.shape == (6, 7)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_stacked_rows_save_the_weights_not_a_copy():
    weights = [torch.randn(64, 32), torch.randn(64, 32)]
    index = torch.arange(0, 64, 2)
    x = torch.randn(5, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stacked_rows_linear(x, tuple((w, None, index) for w in weights))
    matrices = [t for t in saved if t.dim() == 2]
    assert sorted(t.data_ptr() for t in matrices) == sorted(w.data_ptr() for w in weights)


def test_interleaved_forwards_reuse_scratch_safely():
    """Two sliced forwards before either backward (e.g. two losses): both gradients exact."""
    torch.manual_seed(1)
    w1, w2 = torch.randn(20, 8), torch.randn(30, 8)
    i1, i2 = torch.tensor([0, 3, 19]), torch.tensor([2, 5, 7, 29])
    x = torch.randn(4, 8, requires_grad=True)
    loss = rows_linear(x, w1, None, i1).square().sum() + rows_linear(x, w2, None, i2).sum()
    (gx,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference(x_ref, w1, None, i1, 0).square().sum() + reference(x_ref, w2, None, i2, 0).sum()
    (gx_ref,) = torch.autograd.grad(ref, x_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_unfrozen_weight_and_bias_still_get_gradients():
    weight = torch.randn(6, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    rows_linear(torch.randn(3, 4), weight, bias, torch.tensor([1, 2])).sum().backward()
    assert weight.grad is not None and weight.grad[[0, 3, 4, 5]].abs().sum() == 0
    assert bias.grad is not None and bias.grad[1] == 3.0


def test_autocast_bfloat16_gradients_come_back_in_the_input_dtype():
    torch.manual_seed(2)
    weight, index = torch.randn(16, 8), torch.tensor([0, 2, 4, 6, 8])
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rows_linear(x, weight, None, index)
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = reference(x_ref, weight, None, index, 0)
    (gx_ref,) = torch.autograd.grad(y_ref.float().sum(), x_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)


def frozen_linear_checked(layer: torch.nn.Linear, rows: int):
    """`frozen_linear` on (rows, in) random inputs: its output and input gradient, checked
    equal to the layer's own."""
    x = torch.randn(rows, layer.in_features, requires_grad=True)
    y = frozen_linear(x, layer)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer(x_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    return y, gx


@pytest.mark.parametrize("rows", [3, 20, 30])
@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_linear_equals_the_layer_in_either_orientation(rows, with_bias):
    """From TRANSPOSED_MIN_ROWS (16) rows, with at least 4 output channels (96) per row:
    computed as (W x^T)^T, its input gradient as (W^T g^T)^T (transposed results); fewer rows
    or fewer outputs per row: the layer itself. Output and input gradient equal the layer's."""
    torch.manual_seed(4)
    layer = torch.nn.Linear(16, 96, bias=with_bias).requires_grad_(False)
    y, gx = frozen_linear_checked(layer, rows)
    assert y.is_contiguous() == (rows != 20)  # transposed only for 16 <= rows <= 96 / 4
    assert gx.is_contiguous() == (rows != 20)


@pytest.mark.parametrize(
    "out,block",
    [(96, 16), (100, 16), (40, 16), (20, 16), (300, 4)],  # whole blocks, a tail, 2, 1, capped
)
@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_input_grad_equals_grad_times_weight(out, block, transposed, monkeypatch):
    """Sum over row blocks of W (with the rows past the last whole block, with larger blocks
    where the partial products would pass GRAD_PARTIALS_BYTES, with fewer than 2 blocks as
    one product) is grad @ W, for a
    contiguous gradient and for the column-major one a transposed product returns."""
    monkeypatch.setattr(ops, "GRAD_BLOCK_ROWS", block)
    monkeypatch.setattr(ops, "GRAD_PARTIALS_BYTES", 8 * 3 * 12 * 4)  # 8 blocks of (3, 12)
    torch.manual_seed(6)
    weight = torch.randn(out, 12)
    grad = torch.randn(out, 3).t() if transposed else torch.randn(3, out)
    torch.testing.assert_close(ops.blocked_input_grad(grad, weight), grad @ weight)


@pytest.mark.parametrize("rows", [1, 3, 31, 32])
def test_frozen_linear_on_a_large_weight_with_few_rows(rows, monkeypatch):
    """Fewer than SKINNY_ROWS (32) rows on a weight of at least SKINNY_MIN_WEIGHT elements
    (lowered here to this 96 x 16 one): (W x^T)^T with the row-blocked input gradient, equal
    to the layer's; 32 rows is below 4 outputs per row and stays on the layer."""
    monkeypatch.setattr(ops, "SKINNY_MIN_WEIGHT", 96 * 16)
    monkeypatch.setattr(ops, "GRAD_BLOCK_ROWS", 16)
    blocked = []
    original = ops.blocked_input_grad
    monkeypatch.setattr(ops, "blocked_input_grad", lambda g, w: blocked.append(1) or original(g, w))
    torch.manual_seed(7)
    layer = torch.nn.Linear(16, 96).requires_grad_(False)
    y, gx = frozen_linear_checked(layer, rows)
    skinny = rows < 32
    assert y.is_contiguous() == (not skinny or rows == 1)  # (1, out) is contiguous either way
    assert blocked == ([1] if skinny else [])


def test_a_trainable_weight_with_few_rows_stays_on_the_layer(monkeypatch):
    """Few rows on a large weight that requires grad: autograd's backward of the transposed
    product would be (W^T g^T)^T, 10-100x slower there, so the layer computes it."""
    monkeypatch.setattr(ops, "SKINNY_MIN_WEIGHT", 96 * 16)
    layer = torch.nn.Linear(16, 96)
    assert frozen_linear(torch.randn(3, 16), layer).is_contiguous()
    assert not frozen_linear(torch.randn(3, 16), layer.requires_grad_(False)).is_contiguous()


def test_a_small_weight_with_few_rows_stays_on_the_layer():
    """Below SKINNY_MIN_WEIGHT the weight sits in cache and x W^T is as fast: the layer."""
    layer = torch.nn.Linear(16, 96).requires_grad_(False)
    assert layer.weight.numel() < ops.SKINNY_MIN_WEIGHT
    assert frozen_linear(torch.randn(3, 16), layer).is_contiguous()


def test_frozen_linear_still_gives_a_trainable_weight_its_gradient():
    """A weight that requires grad (not frozen after all) goes through autograd's own product,
    so it gets its gradient as the layer would give it."""
    torch.manual_seed(5)
    layer = torch.nn.Linear(16, 96, bias=False)
    x = torch.randn(20, 16, requires_grad=True)
    grad = torch.randn(20, 96)
    gx, gw = torch.autograd.grad(frozen_linear(x, layer), (x, layer.weight), grad)
    gx_ref, gw_ref = torch.autograd.grad(layer(x), (x, layer.weight), grad)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_frozen_linear_calls_a_hooked_layer_as_a_module():
    """A layer with a forward hook (accelerate's device hooks, a user's) keeps running it."""
    layer = torch.nn.Linear(16, 96).requires_grad_(False)
    calls = []
    layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    y = frozen_linear(torch.randn(20, 16), layer)
    assert calls == [20] and y.is_contiguous()


def test_transposed_gemms_can_be_turned_off(monkeypatch):
    """SPARSELORA_TRANSPOSED_GEMMS=0 (read at import) runs every frozen GEMM as the layer."""
    code = "from sparselora.engine import ops; print(ops.TRANSPOSED_GEMMS)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "SPARSELORA_TRANSPOSED_GEMMS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr
    layer = torch.nn.Linear(16, 96).requires_grad_(False)
    assert not frozen_linear(torch.randn(20, 16), layer).is_contiguous()
    monkeypatch.setattr(ops, "TRANSPOSED_GEMMS", False)
    assert frozen_linear(torch.randn(20, 16), layer).is_contiguous()
