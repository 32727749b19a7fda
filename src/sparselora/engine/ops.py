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

import os
import threading

import torch
import torch.nn.functional as F

from sparselora.engine.quant import Weight4bit

_SCRATCH: dict[tuple, torch.Tensor] = {}  # (device, dtype, thread) -> flat buffer


def gather_rows(parts: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The kept rows of one or more weights, stacked: (k_1 + k_2 + ..., in) in `dtype`.

    parts: ((weight, rows), ...), each weight (out_i, in) or a `Weight4bit`, rows (k_i,). Float
    rows are written into a reused per-thread scratch buffer: the result is only valid until the
    next call on the same thread, device and dtype, so use it at once (as an operand), never keep
    it. A 4-bit weight's rows are dequantized (a fresh tensor).
    """
    if len(parts) == 1 and isinstance(parts[0][0], Weight4bit):
        weight, rows = parts[0]
        return weight.kept(0, rows, dtype)
    width = parts[0][0].shape[1]
    total = sum(rows.numel() for _, rows in parts)
    key = (parts[0][1].device, dtype, threading.get_ident())
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < total * width:
        buffer = torch.empty(total * width, dtype=dtype, device=key[0])
        _SCRATCH[key] = buffer
    out = buffer[: total * width].view(total, width)
    start = 0
    for weight, rows in parts:
        segment = out.narrow(0, start, rows.numel())
        if isinstance(weight, Weight4bit):
            segment.copy_(weight.kept(0, rows, dtype))
        else:
            torch.index_select(weight, 0, rows, out=segment)
        start += rows.numel()
    return out


def _kept_cols(weight: torch.Tensor | Weight4bit, cols: torch.Tensor, dtype) -> torch.Tensor:
    """weight.index_select(1, cols) as `dtype` (a fresh tensor; dequantized if 4-bit)."""
    if isinstance(weight, Weight4bit):
        return weight.kept(1, cols, dtype)
    return weight.index_select(1, cols)


class SlicedLinear(torch.autograd.Function):
    """y = x W_s^T + b_s for a slice W_s of frozen weights; gradient for x only.

    dim 0: W_s stacks the kept rows of one or more weights (`parts`: ((weight, rows), ...)), so
    several projections of the same input (gate and up) run as one GEMM. Kept rows are
    contiguous: gathering them again in backward costs a memcpy, so nothing but the (k,) row
    indices is kept and the slice lives in scratch. dim 1: W_s is the kept columns of one
    weight, a strided gather that reads nearly every cache line of W at moderate sparsity: that
    slice is gathered once and saved, as plain autograd would.
    """

    @staticmethod
    def forward(ctx, x, bias, dim, parts):
        ctx.dim, ctx.x_dtype = dim, x.dtype
        if dim == 0:
            # Saved: each float weight (the Parameter itself, no copy) and its (k,) rows; a
            # 4-bit reader is no tensor: it stays on ctx and only its rows are saved.
            ctx.readers = [w if isinstance(w, Weight4bit) else None for w, _ in parts]
            saved = [
                t
                for w, rows in parts
                for t in ((rows,) if isinstance(w, Weight4bit) else (w, rows))
            ]
            ctx.save_for_backward(*saved)
            kept = gather_rows(parts, x.dtype)
        else:
            ((weight, cols),) = parts
            kept = _kept_cols(weight, cols, x.dtype)
            ctx.save_for_backward(kept)
        return F.linear(x, kept, bias)

    @staticmethod
    def backward(ctx, grad):
        if ctx.dim == 0:
            saved, parts = list(ctx.saved_tensors), []
            for reader in ctx.readers:
                weight = reader if reader is not None else saved.pop(0)
                parts.append((weight, saved.pop(0)))
            kept = gather_rows(tuple(parts), ctx.x_dtype)
        else:
            (kept,) = ctx.saved_tensors
        grad_x = grad.matmul(kept.to(grad.dtype)).to(ctx.x_dtype)  # autocast: bf16 grads
        return grad_x, None, None, None


def _sliced(x, parts, bias, dim) -> torch.Tensor:
    quantized = [weight for weight, _ in parts if isinstance(weight, Weight4bit)]
    if quantized:  # as Linear4bit.forward: cast in, compute, cast back
        dtype = quantized[0].compute_dtype(x.dtype)
        bias = None if bias is None else bias.to(dtype)
        return _sliced_frozen(x.to(dtype), parts, bias, dim).to(x.dtype)
    if any(weight.requires_grad for weight, _ in parts):  # unfrozen: autograd
        kept = torch.cat([weight.index_select(dim, index) for weight, index in parts], dim=0)
        return F.linear(x, kept, bias)
    return _sliced_frozen(x, parts, bias, dim)


def _sliced_frozen(x, parts, bias, dim) -> torch.Tensor:
    needs_x_grad = torch.is_grad_enabled() and x.requires_grad
    if (bias is not None and bias.requires_grad) or not needs_x_grad:
        # SlicedLinear gives x its gradient only; without one, no autograd Function is needed
        if dim == 0:
            kept = gather_rows(parts, x.dtype)
            if bias is not None and bias.requires_grad:
                kept = kept.clone()  # autograd keeps operands: not the scratch buffer
        else:
            kept = _kept_cols(parts[0][0], parts[0][1], x.dtype)
        return F.linear(x, kept, bias)
    return SlicedLinear.apply(x, bias, dim, tuple(parts))


def rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Only the kept output channels: x (n, in) -> (n, k) = x W[rows]^T + b[rows]."""
    kept_bias = None if bias is None else bias.index_select(0, rows)
    return _sliced(x, ((weight, rows),), kept_bias, 0)


def stacked_rows_linear(
    x: torch.Tensor,
    parts: tuple[tuple[torch.Tensor | Weight4bit, torch.Tensor | None, torch.Tensor], ...],
) -> torch.Tensor:
    """Kept output channels of several projections of the same input, in one GEMM.

    parts: ((weight, bias, rows), ...), weight (out_i, in), rows (k_i,). x (n, in) ->
    (n, k_1 + k_2 + ...): the columns of part i follow those of part i - 1, each equal to
    `rows_linear(x, weight, bias, rows)`. One gather into one (sum k, in) slice and one GEMM
    instead of one per projection (gate and up of an FFN share the input and the kept channels).
    """
    biases = [bias for _, bias, _ in parts]
    if all(bias is None for bias in biases):
        kept_bias = None
    else:
        kept_bias = torch.cat([
            torch.zeros(rows.numel(), dtype=x.dtype, device=x.device) if bias is None
            else bias.index_select(0, rows)
            for _, bias, rows in parts
        ])  # fmt: skip
    return _sliced(x, tuple((weight, rows) for weight, _, rows in parts), kept_bias, 0)


def cols_linear(
    x_kept: torch.Tensor,
    weight: torch.Tensor | Weight4bit,
    bias: torch.Tensor | None,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Only the kept input channels: x_kept (n, k) -> (n, out) = x_kept W[:, cols]^T + b."""
    return _sliced(x_kept, ((weight, cols),), bias, 1)


TRANSPOSED_MIN_ROWS = 16  # from here, with enough outputs per row: (W x^T)^T, (W^T g^T)^T
TRANSPOSED_MIN_RATIO = 4  # output channels per row from which the transposed product gains
SKINNY_ROWS = 32  # below it, on a large weight: (W x^T)^T and a row-blocked input gradient
SKINNY_MIN_WEIGHT = 1 << 22  # elements (16 MiB in float32): the weight streams from memory
GRAD_BLOCK_ROWS = 256  # rows of W per block in `blocked_input_grad`, at least
GRAD_PARTIALS_BYTES = 64 << 20  # ... and larger blocks where the partial products would exceed it
# SPARSELORA_TRANSPOSED_GEMMS=0 turns the transposed product off: a benchmark control, to tell
# how much of a CPU speed-up is this GEMM-library effect rather than sparsity.
TRANSPOSED_GEMMS = os.environ.get("SPARSELORA_TRANSPOSED_GEMMS", "1") != "0"


def _skinny(rows: int, weight: torch.Tensor) -> bool:
    """Few rows on a weight too large for the cache: the product is bound by reading W."""
    return rows < SKINNY_ROWS and weight.numel() >= SKINNY_MIN_WEIGHT and weight.is_contiguous()


def frozen_linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """x (n, in) -> (n, out) through the whole frozen `layer` (nn.Linear or 4-bit): `layer(x)`.

    On CPU, with a float weight, the same product is computed as (W x^T)^T in two cases: the
    GEMM library then splits the long side across threads, or streams W once at a better rate.
    - at least `TRANSPOSED_MIN_ROWS` rows and at least `TRANSPOSED_MIN_RATIO` times as many
      output channels as rows (the 128 dense answer tokens of a sparse block, the LM head on
      read positions): input gradient (W^T g^T)^T. Measured 1.15-1.3x faster than x W^T for
      16-512 rows of the 8B FFN and attention shapes (8-112 outputs per row), 0.95-1.0x on
      SmolLM2's shapes (1.1-3 outputs per row), so not used there;
    - fewer than `SKINNY_ROWS` rows on a weight of at least `SKINNY_MIN_WEIGHT` elements (the 3
      dense tokens of a commonsense batch): input gradient `blocked_input_grad`. With so few
      rows both products only stream W from memory; x W^T and g W do it at 6-7 GB/s on this
      CPU, (W x^T)^T at 11 and the blocked gradient at 14-17 (docs/PERFORMANCE.md).
    The result is a transposed view; element-wise ops keep that layout and a following
    `frozen_linear` reads it without a copy. A layer with forward hooks (accelerate's device
    hooks, a user's) is called as a module, so they run.
    """
    weight = layer.weight
    plain = type(layer) is torch.nn.Linear and x.device.type == "cpu" and x.dim() == 2
    if not plain or has_hooks(layer) or weight.dtype != x.dtype:
        return layer(x)
    rows = x.shape[0]
    long_side = rows >= TRANSPOSED_MIN_ROWS and rows * TRANSPOSED_MIN_RATIO <= weight.shape[0]
    # a trainable weight would take autograd's (W^T g^T)^T backward, 10-100x slower when skinny
    skinny = _skinny(rows, weight) and not weight.requires_grad
    if not (TRANSPOSED_GEMMS and (long_side or skinny)):
        return layer(x)
    # (n, out), column-major; a weight not frozen after all gets its gradient from autograd's mm
    y = torch.mm(weight, x.t()).t() if weight.requires_grad else TransposedLinear.apply(x, weight)
    return y if layer.bias is None else y + layer.bias


class TransposedLinear(torch.autograd.Function):
    """y = (W x^T)^T for a frozen W, gradient for x only.

    Autograd's own backward of `mm(W, x.t())` matches the strides of x^T and multiplies
    g (n, out) by W (out, in) with n rows. Here the input gradient is (W^T g^T)^T, where the
    transposed product again lets the GEMM library split the long side (1.1-1.2x on the 8B FFN
    and attention shapes with 128 rows, docs/PERFORMANCE.md); for a skinny g on a large W, where
    that product is 10-100x slower, it is `blocked_input_grad`. Saves only W (the Parameter
    itself), as autograd would.
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        ctx.skinny = _skinny(x.shape[0], weight)  # g has x's rows: decided once, here
        return torch.mm(weight, x.t()).t()  # (n, out), column-major

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if ctx.skinny:
            return blocked_input_grad(grad, weight), None
        return torch.mm(weight.t(), grad.t()).t(), None  # (n, in), column-major


def blocked_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad (n, out) @ weight (out, in) -> (n, in), as a sum over row blocks of W.

    One batched product of each block's (n, rows) gradient slice with its (rows, in) rows of W,
    then a sum over the (blocks, n, in) partial products, kept under `GRAD_PARTIALS_BYTES` by
    larger blocks; the rows past the last whole block are added by one more product. For few
    rows this reads W at 1.5-2.5x the rate of `grad @ weight` (the blocks run as independent
    small GEMMs). W must be contiguous.
    """
    n, out = grad.shape
    per_block = n * weight.shape[1] * grad.element_size()  # bytes of one partial product
    rows = max(GRAD_BLOCK_ROWS, -(-out // max(1, GRAD_PARTIALS_BYTES // per_block)))
    blocks = out // rows
    if blocks < 2:
        return grad.mm(weight)
    whole = blocks * rows
    grad_blocks = grad[:, :whole].reshape(n, blocks, rows).transpose(0, 1)  # (blocks, n, rows)
    weight_blocks = weight[:whole].view(blocks, rows, weight.shape[1])  # (blocks, rows, in)
    result = torch.bmm(grad_blocks, weight_blocks).sum(0)
    if whole < out:
        result.addmm_(grad[:, whole:], weight[whole:])
    return result


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` would run more than its forward: its own forward (pre-)hooks,
    accelerate's `_hf_hook`, or global module hooks."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hasattr(module, "_hf_hook")
        or torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
    )


def scatter_channels(y_kept: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """Place (n, k) values at channels `cols` of an (n, width) tensor of zeros."""
    out = y_kept.new_zeros(y_kept.shape[0], width)
    return out.index_copy(1, cols, y_kept)
