"""Model shapes for the analytic FLOPs model: what a step's matmuls look like, from a config.

`ModelShape` holds the dimensions `engine/flops.py` counts with (per layer where layers differ:
Gemma 4), and which projections a family fuses (Phi-3) or gates (Qwen3.5); `load_shape` reads
one from a config.json or a known model alias, so a user sees a model's FLOPs before
downloading its weights. The counting rules are in `engine/flops.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SKIPPED_LAST = ("q_proj", "o_proj") + MLP_PROJECTIONS  # run on read positions only, last layer
DEFAULT_LORA_TARGETS = ATTN_PROJECTIONS
# Position along a decoder layer: q/k/v read the layer input, o the attention output, gate/up
# the FFN input, down the FFN activation. A projection needs an input gradient iff a LoRA
# adapter sits at an earlier position (4 positions per layer).
STAGE = {
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "o_proj": 1,
    "gate_proj": 2,
    "up_proj": 2,
    "down_proj": 3,
    "qkv_proj": 0,  # Phi-3's fused q/k/v
    "gate_up_proj": 2,  # Phi-3's fused gate/up
    "in_proj_qkv": 0,  # Qwen3.5's Gated DeltaNet (linear-attention layers)
    "in_proj_z": 0,
    "in_proj_b": 0,
    "in_proj_a": 0,
    "out_proj": 1,
}
STAGES_PER_LAYER = 4
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_MODEL_TYPES = ("phi3",)
QUERY_GATED_MODEL_TYPES = ("qwen3_5_text",)

# The paper's speed benchmark shapes: (sequence length, labelled tokens per sequence).
TASK_SHAPES: dict[str, tuple[int, int]] = {
    "math": (512, 128),
    "commonsense": (512, 3),
    "code": (1024, 512),
    "chat": (2048, 512),
}


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's attention geometry and FFN width."""

    head_dim: int
    num_kv_heads: int
    intermediate: int
    # "own": k and v projections; "k_eq_v": the keys are the values (no v_proj); "shared": the
    # keys and values of an earlier layer (no k_proj, no v_proj).
    kv: str = "own"

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-style decoder that decide its FLOPs."""

    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layers: tuple[LayerShape, ...] = ()  # one per layer where layers differ; () = all alike
    per_layer_input: int = 0  # Gemma 4's per-layer input width P (0: none)
    fused: bool = False  # Phi-3: q/k/v in one qkv_proj, gate/up in one gate_up_proj
    query_gate: bool = False  # Qwen3.5: q_proj also computes a per-head output gate (nh*hd)
    linear_layers: tuple[int, ...] = ()  # Qwen3.5's Gated DeltaNet layers (no q/k/v/o)
    linear_widths: tuple[int, int, int] = (0, 0, 0)  # their nk*dk, nv*dv and nv

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its dict (config.json); head_dim and
        num_key_value_heads default as transformers does (H / nh, nh). Gemma 4's per-layer
        differences are read from `per_layer_config`, `layer_types`, `num_kv_shared_layers`,
        `use_double_wide_mlp` and `attention_k_eq_v`; Phi-3's fused projections and Qwen3.5's
        gated query from `model_type`, Qwen3.5's linear-attention layers from `layer_types`
        and the `linear_*` sizes."""
        if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
            # A heterogeneous config (Gemma 4) refuses a global read of a per-layer attribute.
            config = config.to_dict()
        if isinstance(config, Mapping):
            if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
                config = config["text_config"]

            def get(key):
                return config.get(key)
        else:

            def get(key):
                return getattr(config, key, None)

        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if get(key) is None]
        if missing:
            raise ValueError(
                f"model config lacks {missing}; a LLaMA-style decoder config needs them"
            )
        if get("enable_moe_block"):
            raise ValueError("mixture-of-experts layers (enable_moe_block) are not counted")
        num_heads = int(get("num_attention_heads"))
        uniform = LayerShape(
            head_dim=int(get("head_dim") or get("hidden_size") // num_heads),
            num_kv_heads=int(get("num_key_value_heads") or num_heads),
            intermediate=int(get("intermediate_size")),
        )
        num_layers = int(get("num_hidden_layers"))
        types = get("layer_types") or []
        linear_layers = tuple(i for i, kind in enumerate(types) if kind == "linear_attention")
        linear_widths = (0, 0, 0)
        if linear_layers:
            value_heads = int(get("linear_num_value_heads"))
            linear_widths = (
                int(get("linear_num_key_heads")) * int(get("linear_key_head_dim")),
                value_heads * int(get("linear_value_head_dim")),
                value_heads,
            )
        return cls(
            hidden=int(get("hidden_size")),
            intermediate=uniform.intermediate,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=uniform.num_kv_heads,
            head_dim=uniform.head_dim,
            vocab_size=int(get("vocab_size")),
            layers=_layer_shapes(get, num_layers, uniform),
            per_layer_input=int(get("hidden_size_per_layer_input") or 0),
            fused=get("model_type") in FUSED_MODEL_TYPES,
            query_gate=get("model_type") in QUERY_GATED_MODEL_TYPES,
            linear_layers=linear_layers,
            linear_widths=linear_widths,
        )

    def layer(self, index: int) -> LayerShape:
        """The geometry of decoder layer `index`."""
        if self.layers:
            return self.layers[index]
        return LayerShape(self.head_dim, self.num_kv_heads, self.intermediate)

    def projections(self, layer: int = 0) -> dict[str, tuple[int, int]]:
        """(in, out) features of each frozen projection of decoder layer `layer`."""
        shape = self.layer(layer)
        h, q, kv, i = (
            self.hidden,
            self.num_heads * shape.head_dim,
            shape.kv_width,
            shape.intermediate,
        )
        ffn = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if layer in self.linear_layers:
            key, value, heads = self.linear_widths
            mixer = {
                "in_proj_qkv": (h, 2 * key + value),
                "in_proj_z": (h, value),
                "in_proj_b": (h, heads),
                "in_proj_a": (h, heads),
                "out_proj": (value, h),
            }
            return {**mixer, **ffn}
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), **ffn}
        absent = {"own": (), "k_eq_v": ("v_proj",), "shared": ("k_proj", "v_proj")}[shape.kv]
        return {proj: d for proj, d in dims.items() if proj not in absent}

    def modules(self, layer: int = 0) -> dict[str, tuple[tuple[int, int], tuple[str, ...]]]:
        """The frozen linear modules of decoder layer `layer`: name -> ((in, out), the
        projections it computes). One per projection, except Phi-3's fused qkv_proj and
        gate_up_proj; Qwen3.5's q_proj is twice the query's width (its output gate)."""
        dims = self.projections(layer)
        out: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {}
        for name, parts in FUSED.items() if self.fused else ():
            present = tuple(p for p in parts if p in dims)
            if present:
                out[name] = ((dims[present[0]][0], sum(dims[p][1] for p in present)), present)
        fused = {p for _, parts in out.values() for p in parts}
        for proj, (d_in, d_out) in dims.items():
            if proj not in fused:
                out[proj] = ((d_in, d_out + self.query_gate_rows(proj)), (proj,))
        return out

    def query_gate_rows(self, proj: str) -> int:
        """Rows that module `proj` computes densely beside the projection (Qwen3.5's gate)."""
        return self.num_heads * self.head_dim if proj == "q_proj" and self.query_gate else 0


def _layer_shapes(get, num_layers: int, uniform: LayerShape) -> tuple[LayerShape, ...]:
    """Per-layer shapes of a Gemma 4 config (per-layer head dim and KV heads, KV-shared last
    layers with optionally double-wide MLPs, keys as values in full-attention layers); () when
    every layer is `uniform`. Mirrors transformers' Gemma4TextAttention and Gemma4TextMLP."""
    overrides = {int(i): fields for i, fields in (get("per_layer_config") or {}).items()}
    shared = int(get("num_kv_shared_layers") or 0)
    k_eq_v = bool(get("attention_k_eq_v"))
    if not (overrides or shared or k_eq_v):
        return ()
    types = get("layer_types") or ["full_attention"] * num_layers
    layers = []
    for i in range(num_layers):
        own = overrides.get(i, {})
        kv = "own"
        if i >= num_layers - shared:
            kv = "shared"
        elif k_eq_v and types[i] != "sliding_attention":
            kv = "k_eq_v"
        double = kv == "shared" and bool(get("use_double_wide_mlp"))
        layers.append(
            LayerShape(
                head_dim=int(own.get("head_dim", uniform.head_dim)),
                num_kv_heads=int(own.get("num_key_value_heads", uniform.num_kv_heads)),
                intermediate=uniform.intermediate * (2 if double else 1),
                kv=kv,
            )
        )
    return tuple(layers)


# Published configs (config.json on the Hugging Face Hub) of the paper's models and of the
# embedded demo model, keyed by model id.
_LLAMA2_7B = ModelShape(4096, 11008, 32, 32, 32, 128, 32000)
_LLAMA3_8B = ModelShape(4096, 14336, 32, 32, 8, 128, 128256)
PAPER_MODELS: dict[str, ModelShape] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": ModelShape(5120, 13824, 40, 40, 40, 128, 32000),
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(576, 1536, 30, 9, 3, 64, 49152),
    "google/gemma-3-270m": ModelShape(640, 2048, 18, 4, 1, 256, 262144),
    # Families beyond the paper, to see their expected saving before downloading anything.
    "Qwen/Qwen3-8B": ModelShape(4096, 12288, 36, 32, 8, 128, 151936),
    "google/gemma-3-12b-pt": ModelShape(3840, 15360, 48, 16, 8, 256, 262208),
    "microsoft/phi-4": ModelShape(5120, 17920, 40, 40, 10, 128, 100352, fused=True),
}
MODEL_ALIASES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma3-12b": "google/gemma-3-12b-pt",
    "phi-4": "microsoft/phi-4",
}


def load_shape(model: str) -> ModelShape:
    """A model id or alias of PAPER_MODELS, or a local directory (or file) with config.json."""
    model_id = MODEL_ALIASES.get(model.lower(), model)
    if model_id in PAPER_MODELS:
        return PAPER_MODELS[model_id]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model {model!r} is neither a known model ({sorted(MODEL_ALIASES)} or "
            f"{sorted(PAPER_MODELS)}) nor a directory holding config.json"
        )
    return ModelShape.from_config(json.loads(path.read_text()))
