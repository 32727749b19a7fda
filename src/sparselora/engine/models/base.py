"""The description of one decoder block that the sparse execution needs."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparselora.engine.peft_compat import base_linear


@dataclass(frozen=True, eq=False)
class Rows:
    """One logical projection stored as some output rows of a (possibly fused) linear module.

    Channel c of the projection is row `offset + (c // group) * stride + c % group` of
    `module`: one contiguous span by default (group = width), or `width / group` groups of
    `group` rows, `stride` rows apart (a per-head interleaved layout). Phi-3's `qkv_proj` holds
    q, k and v as three spans, its `gate_up_proj` gate then up; Qwen3.5's `q_proj` holds per
    head hd query rows then hd rows of its output gate (group hd, stride 2*hd). Rows of a module
    that belong to no logical projection (that gate) always run dense.
    """

    module: nn.Module
    offset: int
    width: int
    group: int | None = None  # rows per group; None: one span of `width` rows
    stride: int | None = None  # rows from one group's start to the next's

    @classmethod
    def whole(cls, module: nn.Module) -> Rows:
        """Every row of an unfused projection, in order."""
        return cls(module, 0, base_linear(module).out_features)

    def rows_of(self, channels: torch.Tensor) -> torch.Tensor:
        """(k,) channel indices -> (k,) row indices of `module` (the same tensor if unfused)."""
        if self.group is None:
            return channels if self.offset == 0 else channels + self.offset
        return self.offset + channels // self.group * self.stride + channels % self.group

    def take(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This projection's part of a tensor indexed by `module`'s rows along `dim` (its
        weight or bias: dim 0; an output (n, out): dim 1). A view for a span, else a copy."""
        if self.group is None:
            return tensor.narrow(dim, self.offset, self.width)
        index = self.rows_of(torch.arange(self.width, device=tensor.device))
        return tensor.index_select(dim, index)


@dataclass
class BlockModules:
    """The modules of one decoder layer that SparseLoRA wraps, and its attention geometry.

    Projections may be PEFT `lora.Linear` wrappers or plain `nn.Linear`; gate, up, q, k and v
    may instead be `Rows` of a fused module (the same module for several of them). A layer
    without standard softmax attention of its own (a linear-attention layer of a hybrid model, a layer
    that reuses another layer's keys and values) has q, k, v and o None and says why in
    `no_attention`: its FFN can be sparse, its attention cannot. `attention` is the layer's
    softmax-attention module (the one that calls its core through transformers'
    `AttentionInterface`), also where it has no q/k/v of its own; None in a layer without one
    (linear attention).
    """

    index: int
    mlp: nn.Module
    gate: nn.Module | Rows
    up: nn.Module | Rows
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    q: nn.Module | Rows | None
    k: nn.Module | Rows | None
    v: nn.Module | Rows | None
    o: nn.Module | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    no_attention: str | None = None  # why q/k/v/o are None, e.g. "linear attention"
    attention: nn.Module | None = None  # the softmax-attention module (its core: attention.py)

    @property
    def has_attention(self) -> bool:
        return self.q is not None

    def projection(self, name: str) -> nn.Module | None:
        """The module that computes projection `name` ('gate_proj', 'q_proj', ...; for a fused
        one, the fused module); None if the layer has none."""
        part = self._parts()[name]
        return part.module if isinstance(part, Rows) else part

    def rows(self, name: str) -> Rows | None:
        """Projection `name` as rows of its module (all of them when unfused); None if absent."""
        part = self._parts()[name]
        if part is None or isinstance(part, Rows):
            return part
        return Rows.whole(part)

    def _parts(self) -> dict[str, nn.Module | Rows | None]:
        return {
            "gate_proj": self.gate,
            "up_proj": self.up,
            "down_proj": self.down,
            "q_proj": self.q,
            "k_proj": self.k,
            "v_proj": self.v,
            "o_proj": self.o,
        }


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
    """Locates the decoder layers of one architecture family.

    The defaults fit the common transformers layout (`model.model.layers`, a plain `lm_head`);
    a family overrides what differs.
    """

    model_types: tuple[str, ...] = ()

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers of the transformers model, in order."""
        return model.model.layers

    @abc.abstractmethod
    def block(self, layer: nn.Module, index: int, config) -> BlockModules:
        """The modules SparseLoRA wraps in decoder layer `index`."""

    def causal_lm_parts(self, model: nn.Module) -> CausalLMParts | None:
        """The decoder body, LM head and logit transform, if the model's loss is cross-entropy
        on finalize(head(body(x))). None turns the labelled-logits saving off for the family
        (a custom head or loss). Default: `model.lm_head` on `model.model`, untransformed, unless
        the config soft-caps the logits (a family that does must say how, as Gemma's does)."""
        head = getattr(model, "lm_head", None)
        if head is None or getattr(model.config, "final_logit_softcapping", None):
            return None
        return CausalLMParts(model.model, head)
