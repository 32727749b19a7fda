"""Model families: where each architecture keeps its FFN and attention projections.

A family maps `config.model_type` to the modules SparseLoRA wraps. Adding an architecture is
one new module that builds `BlockModules` for each decoder layer and registers itself here.
"""

from __future__ import annotations

from sparselora.engine.models.base import BlockModules, CausalLMParts, ModelFamily
from sparselora.engine.models.llama import LlamaFamily

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register(LlamaFamily())


def family_for(model_type: str) -> ModelFamily:
    """The family registered for `model_type`; a clear error lists the supported ones."""
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"SparseLoRA does not support model_type {model_type!r} yet; supported: "
            f"{sorted(FAMILIES)}. A new family is one module in sparselora/models/."
        )
    return FAMILIES[model_type]


__all__ = ["BlockModules", "CausalLMParts", "ModelFamily", "FAMILIES", "family_for", "register"]
