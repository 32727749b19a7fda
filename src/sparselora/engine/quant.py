"""Frozen base weights stored in bitsandbytes 4-bit (QLoRA: nf4 or fp4, optionally with
double-quantized scales), read as float matrices.

A `bnb.nn.Linear4bit` subclasses nn.Linear, but its weight is a packed `Params4bit`: the
row-major flattened (out, in) matrix, two 4-bit codes per byte, with one absmax scale per block
of `blocksize` consecutive values (64 by default; with double quantization, those scales are
themselves 8-bit codes plus a second-level state and an offset). When `in` is a multiple of
`blocksize`, every row is a whole number of blocks, so the kept rows of gate/up/q/k/v are
dequantized alone from their bytes and scales; kept columns (down, o) cut through every block
and need the whole matrix. Both results equal `bitsandbytes.functional.dequantize_4bit` of the
whole weight, then `index_select`, bit for bit (tests/engine/test_qlora.py).

bitsandbytes is imported only when a model already holds one of its layers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

SUPPORTED = "float nn.Linear, or bitsandbytes 4-bit Linear4bit (nf4, fp4)"


def _bnb():
    """The bitsandbytes module if something imported it (a model holding its layers did)."""
    return sys.modules.get("bitsandbytes")


def is_4bit(layer: nn.Module) -> bool:
    """Whether `layer` is a bitsandbytes Linear4bit."""
    bnb = _bnb()
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def check_base_layer(layer: nn.Module) -> None:
    """Raise TypeError unless SparseLoRA can slice `layer`'s frozen weight."""
    weight = getattr(layer, "weight", None)
    if is_4bit(layer):
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise TypeError(
                f"{type(layer).__name__} is not quantized yet (no quant_state): move the model "
                "to its device first, as bitsandbytes quantizes on that move"
            )
        if getattr(state, "packing_format_for_cpu", False):
            raise TypeError(
                "this Linear4bit weight was repacked by bitsandbytes for CPU inference "
                "(packing_format_for_cpu, done by an eval forward on AVX512-BF16 CPUs); reload "
                "the model for training"
            )
        return
    if not isinstance(layer, nn.Linear) or not weight.is_floating_point() or hasattr(weight, "SCB"):
        raise TypeError(
            f"SparseLoRA supports {SUPPORTED} base layers; found {type(layer).__name__} with a "
            f"{type(weight).__name__} weight of dtype {getattr(weight, 'dtype', None)}"
        )


def _absmax(state) -> torch.Tensor:
    """(blocks,) float32 scales of a 4-bit QuantState, as `dequantize_4bit` computes them."""
    if not state.nested:
        return state.absmax
    absmax = _bnb().functional.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax if absmax.dtype == torch.float32 else absmax.float()


def dequantize(layer: nn.Module) -> torch.Tensor:
    """(out, in) the whole weight of a Linear4bit, in its stored dtype (`quant_state.dtype`)."""
    weight = layer.weight
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)


def dequantize_rows(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(k, in) rows `rows` (k,) of a Linear4bit's weight, in its stored dtype.

    Reads only those rows' bytes and scales when each row is whole blocks (`in` a multiple of
    the block size); otherwise dequantizes everything and selects.
    """
    functional = _bnb().functional
    state = layer.weight.quant_state
    out_features, in_features = state.shape
    if in_features % state.blocksize:
        return dequantize(layer).index_select(0, rows)
    packed = layer.weight.data.view(torch.uint8).reshape(out_features, in_features // 2)
    absmax = _absmax(state).view(out_features, in_features // state.blocksize)
    kept_state = functional.QuantState(
        absmax=absmax.index_select(0, rows).reshape(-1),
        shape=torch.Size((rows.numel(), in_features)),
        dtype=state.dtype,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
    )
    return functional.dequantize_4bit(packed.index_select(0, rows), kept_state)


class Weight4bit:
    """The frozen weight of a Linear4bit, read in parts by `ops` when it computes.

    `kept(dim, index, dtype)` is weight.index_select(dim, index) of the dequantized (out, in)
    weight, cast to `dtype`; `compute_dtype(x_dtype)` is the dtype the layer's own forward
    computes in for an input of dtype `x_dtype` (its `compute_dtype`, else the input's).
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.shape = tuple(layer.weight.quant_state.shape)  # (out, in)

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return self.layer.compute_dtype or x_dtype

    def kept(self, dim: int, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dim == 0:
            return dequantize_rows(self.layer, index).to(dtype)  # (k, in)
        return dequantize(self.layer).index_select(1, index).to(dtype)  # (out, k)


def frozen_weight(layer: nn.Linear) -> torch.Tensor | Weight4bit:
    """What `ops.rows_linear` / `ops.cols_linear` slice: the weight, or a Weight4bit reader."""
    return Weight4bit(layer) if is_4bit(layer) else layer.weight


def float_weight(layer: nn.Linear) -> torch.Tensor:
    """(out, in) the frozen weight as floats: the weight itself, or its whole dequantization."""
    return dequantize(layer) if is_4bit(layer) else layer.weight
