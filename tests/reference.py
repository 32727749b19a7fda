"""Masked-dense reference: the dense PEFT model with the non-kept channels of the frozen
projections zeroed for sparse tokens, built from forward hooks only (no sparselora code).

Where each projection's channels live is the test's own reading of the model code (`Place`),
not the library's: LLaMA-style models keep one module per projection (`LLAMA`); a fused
module (Phi-3's qkv_proj) holds several projections at row offsets, and its mask zeroes the
non-kept rows of each, leaving the rows no projection owns (Qwen3.5's output gate) unmasked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparselora.engine.peft_compat import base_linear


@dataclass(frozen=True)
class Place:
    """Projection channel c is output row (gate/up/q/k/v) or input column (down/o) `row(c)`
    of the module at `path` in a decoder layer; `width` channels (None: all of the module's)."""

    path: str
    width: int | None = None
    row: Callable[[torch.Tensor], torch.Tensor] = lambda channels: channels


LLAMA = {
    name: Place(f"{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}")
    for name in ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")
}


def _mask(kept: torch.Tensor, sparse_tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, width) with 1 for dense tokens and, for sparse tokens, `kept` (width,)."""
    dense = (~sparse_tokens).float().unsqueeze(-1)  # (B, L, 1)
    return dense + (1.0 - dense) * kept


def _kept_rows(width: int, parts) -> torch.Tensor:
    """(width,) 1 at the kept rows of each (place, keep) part and at rows no part owns."""
    kept = torch.ones(width)
    for place, _ in parts:
        kept[place.row(torch.arange(place.width or width))] = 0.0
    for place, keep in parts:
        kept[place.row(keep)] = 1.0
    return kept


def install_masks(
    peft_model, selection, sparse_tokens, sparse_lora_branch=False, layout=LLAMA, layers=None
):
    """Hooks that make `peft_model` compute the masked-dense reference; returns the handles.

    selection: {layer: {projection: kept channels}} as `handle.last_selection()` returns it;
    layout: {projection: Place} for the model's decoder layers;
    layers: the decoder layers, when not the causal LM's `model.layers` (multimodal wrappers).
    """
    if layers is None:
        layers = peft_model.get_base_model().model.layers
    hooks = []

    def out_hook(mask):
        return lambda module, args, output: output * mask.to(output.dtype)

    def in_hook(mask):
        return lambda module, args: (args[0] * mask.to(args[0].dtype), *args[1:])

    def mask_outputs(layer, names, chosen, scope):
        by_module = {}
        for name in names:
            place = layout[name]
            module = layer.get_submodule(place.path)
            by_module.setdefault(id(module), (module, []))[1].append((place, chosen[name]))
        for module, parts in by_module.values():
            kept = _kept_rows(base_linear(module).out_features, parts)
            hooks.append(scope(module).register_forward_hook(out_hook(_mask(kept, sparse_tokens))))

    def mask_inputs(layer, name, keep, scope):
        place = layout[name]
        module = layer.get_submodule(place.path)
        kept = _kept_rows(base_linear(module).in_features, [(place, keep)])
        hooks.append(scope(module).register_forward_pre_hook(in_hook(_mask(kept, sparse_tokens))))

    for index, chosen in selection.items():
        layer = layers[index]
        if "gate_proj" in chosen:
            scope = (lambda m: m) if sparse_lora_branch else base_linear
            mask_outputs(layer, ("gate_proj", "up_proj"), chosen, scope)
            mask_inputs(layer, "down_proj", chosen["down_proj"], scope)
        if "q_proj" in chosen:
            mask_outputs(layer, ("q_proj", "k_proj", "v_proj"), chosen, base_linear)
            mask_inputs(layer, "o_proj", chosen["o_proj"], base_linear)
    return hooks


def loss_and_grads(peft_model, batch):
    """Loss and gradients of every trainable parameter and of the input embeddings."""
    peft_model.zero_grad(set_to_none=True)
    embed = peft_model.get_input_embeddings()
    inputs_embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
    out = peft_model(
        inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = inputs_embeds.grad.clone()
    return out.loss.detach(), out.logits.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(result, expected, tol: float) -> None:
    """(loss, logits, grads) of `loss_and_grads` against a reference's, each within relative L2
    `tol`; the same gradients must be present on both sides."""
    loss, logits, grads = result
    ref_loss, ref_logits, ref_grads = expected
    assert rel_err(loss, ref_loss) < tol
    assert rel_err(logits, ref_logits) < tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < tol, name
