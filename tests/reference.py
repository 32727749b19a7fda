"""Masked-dense reference: the dense PEFT model with the non-kept channels of the frozen
projections zeroed for sparse tokens, built from forward hooks only (no sparselora code)."""

from __future__ import annotations

import torch

from sparselora.engine.peft_compat import base_linear


def _mask(width: int, keep: torch.Tensor, sparse_tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, width) with 1 for dense tokens and for kept channels of sparse tokens."""
    kept = torch.zeros(width)
    kept[keep] = 1.0
    dense = (~sparse_tokens).float().unsqueeze(-1)  # (B, L, 1)
    return dense + (1.0 - dense) * kept


def install_masks(peft_model, selection, sparse_tokens, sparse_lora_branch=False):
    """Hooks that make `peft_model` compute the masked-dense reference; returns the handles."""
    layers = peft_model.get_base_model().model.layers
    hooks = []

    def out_hook(mask):
        return lambda module, args, output: output * mask.to(output.dtype)

    def in_hook(mask):
        return lambda module, args: (args[0] * mask.to(args[0].dtype), *args[1:])

    for index, chosen in selection.items():
        layer = layers[index]
        mlp, attn = layer.mlp, layer.self_attn
        if "gate_proj" in chosen:
            keep = chosen["gate_proj"]
            mask = _mask(base_linear(mlp.gate_proj).out_features, keep, sparse_tokens)
            scope = (lambda m: m) if sparse_lora_branch else base_linear
            hooks.append(scope(mlp.gate_proj).register_forward_hook(out_hook(mask)))
            hooks.append(scope(mlp.up_proj).register_forward_hook(out_hook(mask)))
            hooks.append(scope(mlp.down_proj).register_forward_pre_hook(in_hook(mask)))
        if "q_proj" in chosen:
            for name in ("q_proj", "k_proj", "v_proj"):
                linear = base_linear(getattr(attn, name))
                mask = _mask(linear.out_features, chosen[name], sparse_tokens)
                hooks.append(linear.register_forward_hook(out_hook(mask)))
            linear = base_linear(attn.o_proj)
            mask = _mask(linear.in_features, chosen["o_proj"], sparse_tokens)
            hooks.append(linear.register_forward_pre_hook(in_hook(mask)))
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
