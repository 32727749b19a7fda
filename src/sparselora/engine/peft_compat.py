"""What SparseLoRA needs to know about a (possibly PEFT-wrapped) linear layer.

A targeted projection is either a plain `nn.Linear` (no adapter on it) or a PEFT `lora.Linear`
whose frozen `base_layer` is the `nn.Linear` (float, or bitsandbytes 4-bit). The LoRA delta is
recomputed here exactly as PEFT computes it (dropout, cast to the adapter dtype, scaling, every
active adapter), optionally on a slice of channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselora.engine import ops
from sparselora.engine.quant import check_base_layer, float_weight


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen nn.Linear under any PEFT wrapping: a float one or a bitsandbytes 4-bit
    Linear4bit (read its weight through `engine.quant`). TypeError for anything else."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    check_base_layer(module)
    return module


def active_lora_adapters(module: nn.Module) -> list[str]:
    """Names of the adapters that contribute to this module's output right now."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False):
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def check_supported(module: nn.Module, name: str) -> None:
    """Refuse LoRA variants whose forward we do not reproduce exactly.

    Plain LoRA and DoRA on a linear layer are reproduced; DoRA only as the module's single
    active adapter and without dropout (docs/METHOD.md, section 6, "DoRA").
    """
    variants = getattr(module, "lora_variant", {}) or {}
    active = active_lora_adapters(module)
    for adapter in (a for a in active if a in variants):
        variant = type(variants[adapter]).__name__
        if variant != "DoraLinearVariant":
            raise NotImplementedError(
                f"{name}: LoRA variant {variant} (adapter {adapter!r}) is not supported by "
                "SparseLoRA; use plain LoRA or DoRA (use_dora=True) on linear layers"
            )
        if len(active) > 1:
            raise NotImplementedError(
                f"{name}: DoRA adapter {adapter!r} is active together with {len(active) - 1} "
                "other adapter(s); SparseLoRA supports DoRA only as the single active adapter of "
                "a module (PEFT's DoRA rescales the output of the adapters before it)"
            )
        if not isinstance(module.lora_dropout[adapter], nn.Identity):
            raise NotImplementedError(
                f"{name}: DoRA adapter {adapter!r} has lora_dropout > 0, which SparseLoRA does not "
                "support (PEFT's DoRA then recomputes the frozen projection on the dropped-out "
                "input); use lora_dropout=0 with use_dora=True"
            )


def is_merged(module: nn.Module) -> bool:
    return bool(getattr(module, "merged", False))


def lora_delta(
    module: nn.Module,
    x: torch.Tensor,
    out_rows: torch.Tensor | None = None,
    in_cols: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Sum of the active LoRA branches, B(A(dropout(x))) * scaling, or None without adapters.

    x: (n, in), or (n, k) when `in_cols` (k,) says which input channels x holds. With `out_rows`
    (k,), only those output channels are computed: (n, k) instead of (n, out). Slicing A's
    columns or B's rows keeps the gradient of the trainable A and B exact for what is computed.
    """
    delta = None
    for name in active_lora_adapters(module):
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        h = module.lora_dropout[name](x.to(lora_a.weight.dtype))
        if in_cols is None:
            h = lora_a(h)
        else:
            h = F.linear(h, lora_a.weight.index_select(1, in_cols), lora_a.bias)
        if out_rows is None:
            h = lora_b(h)
        else:
            bias = None if lora_b.bias is None else lora_b.bias.index_select(0, out_rows)
            h = F.linear(h, lora_b.weight.index_select(0, out_rows), bias)
        h = h * module.scaling[name]
        delta = h if delta is None else delta + h
    return delta


def dora_adapter(module: nn.Module) -> str | None:
    """The module's active DoRA adapter, or None when its adapters are plain LoRA (or absent)."""
    magnitudes = getattr(module, "lora_magnitude_vector", None) or {}
    active = active_lora_adapters(module)
    dora = [name for name in active if name in magnitudes]
    if dora and len(active) > 1:
        check_supported(module, type(module).__name__)  # raises, naming the setting
    return dora[0] if dora else None


def plus_adapters(
    module: nn.Module,
    y: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor | None = None,
    in_cols: torch.Tensor | None = None,
    full_width: bool = False,
) -> torch.Tensor:
    """y plus the active adapters' output on the same tokens, as PEFT's forward adds it, summed
    in the wider dtype and rounded once to y's.

    y: the frozen base output (bias included): (n, out), or (n, k) holding only output rows
      `rows` (k,). Without `full_width` the adapters are computed on those rows only (n, k);
      with it y is scattered to (n, out), zeros at the other rows, and the adapters run on
      every row.
    x: (n, in) the module's input, or (n, k') when `in_cols` (k',) says which input channels x
      holds (the adapters then read those columns of A).
    Plain LoRA adds `lora_delta`. DoRA (one active adapter, no dropout) adds, as PEFT's
    `DoraLinearLayer.forward` does, (s - 1) * (y - bias) + s * B(A(x)) * scaling with
    s = magnitude / ||W + scaling B A|| per output row, the norm taken on the whole weight rows
    (never on a slice of its input columns) and detached.
    """
    out_rows = None if full_width else rows
    adapter = dora_adapter(module)
    if adapter is None:
        delta = lora_delta(module, x, out_rows, in_cols)
        if full_width:
            y = ops.scatter_channels(y, rows, base_linear(module).out_features)
        return y if delta is None else (y + delta).to(y.dtype)
    base = base_linear(module)
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    x = x.to(lora_a.weight.dtype)
    a_weight = lora_a.weight if in_cols is None else lora_a.weight.index_select(1, in_cols)
    b_weight = lora_b.weight if out_rows is None else lora_b.weight.index_select(0, out_rows)
    lora = F.linear(F.linear(x, a_weight), b_weight)  # (n, out) or (n, k); DoRA has no lora_bias
    magnitude = module.lora_magnitude_vector[adapter].weight  # (out,), trainable
    if out_rows is not None:
        magnitude = magnitude.index_select(0, out_rows)
    scale = magnitude / dora_weight_norm(module, adapter, out_rows, x.dtype)  # (out,) or (k,)
    frozen = y
    if base.bias is not None:
        frozen = y - (base.bias if rows is None else base.bias.index_select(0, rows))
    if full_width:
        y = ops.scatter_channels(y, rows, base.out_features)
        frozen = ops.scatter_channels(frozen, rows, base.out_features)
    dora = (scale - 1) * frozen + scale * lora * module.scaling[adapter]
    return (y + dora).to(y.dtype)


def dora_weight_norm(
    module: nn.Module, adapter: str, rows: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(out,) ||W + scaling B A||_2 of every output row, or (k,) of rows `rows` only, in `dtype`
    (the adapter's), without gradient: PEFT detaches it (DoRA paper, section 4.3). Each row's
    norm reads that row alone, so the kept rows' norms are those of the whole weight."""
    with torch.no_grad():
        weight = float_weight(base_linear(module))  # (out, in)
        b_weight = module.lora_B[adapter].weight  # (out, r)
        if rows is not None:
            weight, b_weight = weight.index_select(0, rows), b_weight.index_select(0, rows)
        lora_weight = (b_weight @ module.lora_A[adapter].weight).to(dtype)  # (out or k, in)
        combined = weight.to(dtype) + module.scaling[adapter] * lora_weight
        return torch.linalg.norm(combined, dim=1).to(dtype)
