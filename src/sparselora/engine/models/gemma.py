"""The Gemma family: Gemma 2, Gemma 3 (text model, alone or inside the multimodal wrapper) and
Gemma 4 (text model).

The projections sit where LLaMA keeps them (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
head-major, grouped-query), so the sparse FFN and q/k/v/o are LLaMA's. What differs, and how it
is handled:

- GeGLU: the gate activation is `gelu_pytorch_tanh`; `BlockModules.act` is the layer's own
  `mlp.act_fn`, used by the sparse FFN and by the channel scores.
- head_dim is not hidden / heads, and in Gemma 4 it differs between sliding and full-attention
  layers: the geometry is read from each layer's attention module, never from the config.
- Pre- and post-norms around attention and FFN, q/k norms (Gemma 3/4), Gemma 4's scale-free
  v norm, attention-logit soft-capping (Gemma 2), sliding windows, the embedding scale and
  Gemma 4's per-layer inputs are the model's own code between the projections; they run
  unchanged. A q/k/v norm therefore normalises each head over its kept channels (zeros
  elsewhere), exactly as the masked-dense reference does.
- Final logit soft-capping: `CausalLMParts.finalize` applies it as the causal LM does, so the
  labelled-logits saving returns the model's logits and loss.
- Gemma 4 layers that reuse an earlier layer's keys and values (KV sharing) and layers whose
  values are their keys (`attention_k_eq_v`) have no k/v pair of their own to slice: their
  attention runs dense (attention sparsity there is a ConfigError), their FFN can be sparse.
  The FFN width is each layer's own (KV-shared layers may have a double-wide MLP).
- Gemma 4's mixture-of-experts block is not supported (NotImplementedError).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from sparselora.engine.models.base import BlockModules, CausalLMParts, ModelFamily

KV_SHARED = (
    "reuses the keys and values of an earlier layer (Gemma 4 KV sharing, "
    "num_kv_shared_layers): it has no k_proj / v_proj of its own"
)
K_EQ_V = (
    "its values are its keys, one k_proj for both (Gemma 4 attention_k_eq_v): no v_proj "
    "channels to choose apart from the keys'"
)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's final logit soft-capping, in the causal LM's order: cap * tanh(logits / cap)."""
    return torch.tanh(logits / cap) * cap


def gemma_block(layer: nn.Module, index: int) -> BlockModules:
    """The modules of one Gemma decoder layer; geometry from its attention module."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    num_heads = attn.config.num_attention_heads
    num_kv_heads = num_heads // attn.num_key_value_groups
    if getattr(attn, "is_kv_shared_layer", False):
        no_attention = KV_SHARED
    elif getattr(attn, "v_proj", None) is None:
        no_attention = K_EQ_V
    else:
        no_attention = None
    own = no_attention is None
    return BlockModules(
        index=index,
        mlp=mlp,
        gate=mlp.gate_proj,
        up=mlp.up_proj,
        down=mlp.down_proj,
        act=mlp.act_fn,  # GeGLU: gelu_pytorch_tanh
        q=attn.q_proj if own else None,
        k=attn.k_proj if own else None,
        v=attn.v_proj if own else None,
        o=attn.o_proj if own else None,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        no_attention=no_attention,
        attention=attn,  # a KV-shared or keys-as-values layer still has its softmax core
    )


def _check_no_experts(config) -> None:
    if getattr(config, "enable_moe_block", False):
        raise NotImplementedError(
            "SparseLoRA does not support Gemma 4's mixture-of-experts block "
            "(enable_moe_block=True): its experts run beside the dense MLP and are not "
            "sliced. Use a dense Gemma 4 model."
        )


class GemmaFamily(ModelFamily):
    """Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma4ForCausalLM: `model.model.layers`."""

    model_types = ("gemma2", "gemma3_text", "gemma4_text")

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        _check_no_experts(model.config)
        return model.model.layers

    def causal_lm_parts(self, model: nn.Module) -> CausalLMParts | None:
        head = getattr(model, "lm_head", None)
        if head is None:
            return None
        cap = getattr(model.config, "final_logit_softcapping", None)
        finalize = functools.partial(softcap, cap=cap) if cap is not None else None
        return CausalLMParts(model.model, head, finalize)

    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        return gemma_block(layer, index)


class Gemma3MultimodalFamily(ModelFamily):
    """Gemma3ForConditionalGeneration: the text decoder is `model.model.language_model`.

    Only text-only forwards take the labelled-logits shortcut (a call with pixel values or
    token type ids runs the model's own forward). The wrapper applies no logit soft-capping,
    so neither does its head here.
    """

    model_types = ("gemma3",)

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.model.language_model.layers

    def causal_lm_parts(self, model: nn.Module) -> CausalLMParts | None:
        head = getattr(model, "lm_head", None)
        return None if head is None else CausalLMParts(model.model, head)

    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        return gemma_block(layer, index)
