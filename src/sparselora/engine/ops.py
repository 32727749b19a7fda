"""Sparse linear primitives on frozen weights (no transformers import).

A frozen weight never needs a gradient, so the backward of a sliced matmul needs only the input
gradient through the same slice. `SlicedLinear` computes it without keeping row slices: forward
and backward each gather the kept rows into a per-thread scratch buffer that is reused from call
to call, and autograd saves only the (k,) indices. Plain `index_select` + `F.linear` would
allocate a fresh (k, in) copy per call and keep it alive until backward (memory the dense step
does not spend). Column slices, whose gather is strided and costly, are kept as plain autograd
keeps them (docs/PERFORMANCE.md has the measurements behind both choices). A bitsandbytes 4-bit
weight (`quant.Weight4bit`) is dequantized in the same parts instead of gathered: kept rows alone
(again in backward, as bitsandbytes itself dequantizes there), kept columns from the whole tile;
the product runs in the layer's compute dtype, as its own forward does. Shapes: n tokens, in/out
features, k kept channels.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from sparselora.engine.quant import Weight4bit

_SCRATCH: dict[tuple, torch.Tensor] = {}  # (device, dtype, thread) -> flat buffer


def gather_weight(weight: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """weight.index_select(dim, index) written into a reused scratch buffer.

    The result is only valid until the next call on the same thread, device and dtype: use it
    at once (as an operand), never keep it.
    """
    shape = (index.numel(), weight.shape[1]) if dim == 0 else (weight.shape[0], index.numel())
    size = shape[0] * shape[1]
    key = (weight.device, weight.dtype, threading.get_ident())
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = weight.new_empty(size)
        _SCRATCH[key] = buffer
    return torch.index_select(weight, dim, index, out=buffer[:size].view(shape))


def _kept(weight: torch.Tensor | Weight4bit, dim: int, index: torch.Tensor, dtype, scratch: bool):
    """weight.index_select(dim, index) as `dtype`: in scratch (`gather_weight`) if `scratch`,
    dequantized if the weight is 4-bit."""
    if isinstance(weight, Weight4bit):
        return weight.kept(dim, index, dtype)
    return gather_weight(weight, dim, index) if scratch else weight.index_select(dim, index)


class SlicedLinear(torch.autograd.Function):
    """y = x W_s^T + b_s with W_s = W.index_select(dim, index); gradient for x only.

    Kept rows (dim 0) are contiguous: gathering them again in backward costs a memcpy, so only
    the indices are saved and the (k, in) slice lives in scratch. Kept columns (dim 1) are a
    strided gather that reads nearly every cache line of W at moderate sparsity: that slice is
    gathered once and saved, as plain autograd would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, index, dim):
        ctx.dim, ctx.x_dtype = dim, x.dtype
        if dim == 0:
            ctx.reader = weight if isinstance(weight, Weight4bit) else None  # not a tensor
            saved = (index,) if ctx.reader else (weight, index)
            ctx.save_for_backward(*saved)
            kept = _kept(weight, dim, index, x.dtype, scratch=True)
        else:
            kept = _kept(weight, dim, index, x.dtype, scratch=False)
            ctx.save_for_backward(kept)
        return F.linear(x, kept, bias)

    @staticmethod
    def backward(ctx, grad):
        if ctx.dim == 0:
            *weight, index = ctx.saved_tensors
            kept = _kept(ctx.reader or weight[0], 0, index, ctx.x_dtype, scratch=True)
        else:
            (kept,) = ctx.saved_tensors
        grad_x = grad.matmul(kept.to(grad.dtype)).to(ctx.x_dtype)  # autocast: bf16 grads
        return grad_x, None, None, None, None


def _sliced(x, weight, bias, index, dim) -> torch.Tensor:
    if isinstance(weight, Weight4bit):  # as Linear4bit.forward: cast in, compute, cast back
        dtype = weight.compute_dtype(x.dtype)
        bias = None if bias is None else bias.to(dtype)
        return _sliced_frozen(x.to(dtype), weight, bias, index, dim).to(x.dtype)
    if weight.requires_grad:  # unfrozen: autograd
        return F.linear(x, weight.index_select(dim, index), bias)
    return _sliced_frozen(x, weight, bias, index, dim)


def _sliced_frozen(x, weight, bias, index, dim) -> torch.Tensor:
    if bias is not None and bias.requires_grad:  # SlicedLinear gives x its gradient only
        return F.linear(x, _kept(weight, dim, index, x.dtype, scratch=False), bias)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, _kept(weight, dim, index, x.dtype, scratch=True), bias)
    return SlicedLinear.apply(x, weight, bias, index, dim)


def rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Only the kept output channels: x (n, in) -> (n, k) = x W[rows]^T + b[rows]."""
    kept_bias = None if bias is None else bias.index_select(0, rows)
    return _sliced(x, weight, kept_bias, rows, 0)


def cols_linear(
    x_kept: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    bias: torch.Tensor | None,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Only the kept input channels: x_kept (n, k) -> (n, out) = x_kept W[:, cols]^T + b."""
    return _sliced(x_kept, weight, bias, cols, 1)


def scatter_channels(y_kept: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """Place (n, k) values at channels `cols` of an (n, width) tensor of zeros."""
    out = y_kept.new_zeros(y_kept.shape[0], width)
    return out.index_copy(1, cols, y_kept)
