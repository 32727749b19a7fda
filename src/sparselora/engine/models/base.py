"""The description of one decoder block that the sparse execution needs."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BlockModules:
    """The modules of one decoder layer that SparseLoRA wraps, and its attention geometry.

    Projections may be PEFT `lora.Linear` wrappers or plain `nn.Linear`. A layer without
    standard softmax attention of its own (a linear-attention layer of a hybrid model, a layer
    that reuses another layer's keys and values) has q, k, v and o None and says why in
    `no_attention`: its FFN can be sparse, its attention cannot.
    """

    index: int
    mlp: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    no_attention: str | None = None  # why q/k/v/o are None, e.g. "linear attention"

    @property
    def has_attention(self) -> bool:
        return self.q is not None

    def projection(self, name: str) -> nn.Module | None:
        """The projection module by its HF name: 'gate_proj', 'q_proj', ... (None: absent)."""
        return {
            "gate_proj": self.gate,
            "up_proj": self.up,
            "down_proj": self.down,
            "q_proj": self.q,
            "k_proj": self.k,
            "v_proj": self.v,
            "o_proj": self.o,
        }[name]


@dataclass
class CausalLMParts:
    """How a causal LM turns its decoder's last hidden states into logits.

    logits = finalize(head(decoder(...).last_hidden_state)); `finalize` is None when the head's
    output is used as is, else the model's own logit transform (soft-capping, a scale), which
    the labelled-logits saving must apply exactly as the model does.
    """

    decoder: nn.Module
    head: nn.Module
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None


class ModelFamily(abc.ABC):
    """Locates the decoder layers of one architecture family."""

    model_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers of the transformers model, in order."""

    @abc.abstractmethod
    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        """The modules SparseLoRA wraps in decoder layer `index`."""

    def causal_lm_parts(self, model: nn.Module) -> CausalLMParts | None:
        """The decoder body, LM head and logit transform, if the model's loss is cross-entropy
        on finalize(head(body(x))). None turns the labelled-logits saving off for the family
        (a custom head or loss)."""
        return None
