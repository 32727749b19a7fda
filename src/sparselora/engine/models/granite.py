"""IBM Granite 3.x (dense): LLaMA's layout, and logits divided by `config.logits_scaling`.

Granite's other multipliers (embedding, residual, attention) sit inside the decoder's own code and
need nothing here. Its LM head output is scaled before the loss, so the labelled-logits saving
must scale the logits it computes the same way.
"""

from __future__ import annotations

from torch import nn

from sparselora.engine.models.base import CausalLMParts
from sparselora.engine.models.llama import LlamaFamily


class GraniteFamily(LlamaFamily):
    model_types = ("granite",)

    def causal_lm_parts(self, model: nn.Module) -> CausalLMParts | None:
        parts = super().causal_lm_parts(model)
        if parts is not None:
            config = model.config
            # As GraniteForCausalLM.forward: logits = lm_head(hidden) / config.logits_scaling.
            parts.finalize = lambda logits: logits / config.logits_scaling
        return parts
