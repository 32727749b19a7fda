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

    Projections may be PEFT `lora.Linear` wrappers or plain `nn.Linear`.
    """

    index: int
    mlp: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def projection(self, name: str) -> nn.Module:
        """The projection module by its HF name: 'gate_proj', 'q_proj', ..."""
        return {
            "gate_proj": self.gate,
            "up_proj": self.up,
            "down_proj": self.down,
            "q_proj": self.q,
            "k_proj": self.k,
            "v_proj": self.v,
            "o_proj": self.o,
        }[name]


class ModelFamily(abc.ABC):
    """Locates the decoder layers of one architecture family."""

    model_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers of the transformers model, in order."""

    @abc.abstractmethod
    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        """The modules SparseLoRA wraps in decoder layer `index`."""

    def causal_lm_parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """(decoder body, LM head) if the model's loss is cross-entropy on head(body(x)).

        None turns the labelled-logits saving off for the family (logit soft-capping or
        scaling, a custom head).
        """
        return None
