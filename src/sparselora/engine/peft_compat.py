"""What SparseLoRA needs to know about a (possibly PEFT-wrapped) linear layer.

A targeted projection is either a plain `nn.Linear` (no adapter on it) or a PEFT `lora.Linear`
whose frozen `base_layer` is the `nn.Linear`. The LoRA delta is recomputed here exactly as PEFT
computes it (dropout, cast to the adapter dtype, scaling, every active adapter), optionally on a
slice of channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def base_linear(module: nn.Module) -> nn.Linear:
    """The frozen nn.Linear under any PEFT wrapping."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"SparseLoRA needs nn.Linear base layers, found {type(module).__name__} "
            "(quantized base layers are not supported yet)"
        )
    return module


def active_lora_adapters(module: nn.Module) -> list[str]:
    """Names of the adapters that contribute to this module's output right now."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False):
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def check_supported(module: nn.Module, name: str) -> None:
    """Refuse LoRA variants whose forward we do not reproduce (DoRA, ...)."""
    variants = getattr(module, "lora_variant", {}) or {}
    used = [a for a in active_lora_adapters(module) if a in variants]
    if used:
        raise NotImplementedError(
            f"{name}: LoRA variant {type(variants[used[0]]).__name__} (adapter {used[0]!r}) is "
            "not supported by SparseLoRA; use plain LoRA (use_dora=False)"
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
