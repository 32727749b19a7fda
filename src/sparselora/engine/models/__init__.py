"""Model families: where each architecture keeps its FFN and attention projections.

A family maps `config.model_type` to the modules SparseLoRA wraps. Adding an architecture is
one new module that builds `BlockModules` for each decoder layer and registers itself here.
"""

from __future__ import annotations

import inspect

from transformers import CONFIG_MAPPING

from sparselora.engine.models.base import BlockModules, CausalLMParts, ModelFamily, Rows
from sparselora.engine.models.gemma import Gemma3MultimodalFamily, GemmaFamily
from sparselora.engine.models.granite import GraniteFamily
from sparselora.engine.models.llama import LlamaFamily
from sparselora.engine.models.phi3 import Phi3Family
from sparselora.engine.models.qwen3_5 import Qwen35Family

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register(LlamaFamily())
register(GemmaFamily())
register(Gemma3MultimodalFamily())
register(GraniteFamily())
register(Phi3Family())
register(Qwen35Family())


def family_for(model_type: str) -> ModelFamily:
    """The family registered for `model_type`; a clear error lists the supported ones."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if _has_experts(model_type):
        raise NotImplementedError(
            f"SparseLoRA does not support model_type {model_type!r}: mixture-of-experts models "
            f"(an FFN of routed experts, not one gate/up/down MLP) are not supported; "
            f"supported: {sorted(FAMILIES)}."
        )
    raise NotImplementedError(
        f"SparseLoRA does not support model_type {model_type!r} yet; supported: "
        f"{sorted(FAMILIES)}. A new family is one module in sparselora/engine/models/."
    )


# The constructor arguments through which transformers' configs count mixture-of-experts experts.
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _has_experts(model_type: str | None) -> bool:
    """Whether transformers' config for `model_type` has expert layers by default (a non-zero
    default expert count; Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, DeepSeek-V3, ...)."""
    if model_type not in CONFIG_MAPPING:
        return False
    parameters = inspect.signature(CONFIG_MAPPING[model_type].__init__).parameters
    defaults = [parameters[name].default for name in _EXPERT_COUNTS if name in parameters]
    return any(d not in (None, 0, inspect.Parameter.empty) for d in defaults)


__all__ = [
    "BlockModules",
    "CausalLMParts",
    "ModelFamily",
    "Rows",
    "FAMILIES",
    "family_for",
    "register",
]
