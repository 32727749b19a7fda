"""Analytic FLOPs of one LoRA or SparseLoRA training step, from a model config alone.

Counts what `blocks.py` computes (docs/METHOD.md, FLOPs accounting and the speed protocol), so
the predicted speedup is the one the implementation can reach. A matmul (m, k) x (k, n) costs
2mkn; a step is forward + backward.
Notation: B sequences of L tokens, `out` of them labelled (labels != -100, the last `out` of each
sequence in the benchmark shapes), T = B*L tokens, H hidden, I intermediate, nh / nkv query /
key-value heads, hd head dim, G = nh / nkv, V vocabulary, r LoRA rank.

What is counted, per decoder layer:
- Frozen projections (q, k, v, o, gate, up, down): forward 2*T*in*out. Backward: the input
  gradient only (1x forward); no weight gradient. In a sparse layer the T - B*out context tokens
  use the kept channels: FFN k = num_kept(I, s) rows of gate/up and columns of down; attention
  k_qk = num_kept(nkv*hd, s) KV channels, so q keeps k_qk*G of nh*hd rows and k keeps k_qk; v
  keeps k_v = num_kept(nkv*hd, s) rows and o reads k_v*G of nh*hd columns. The B*out labelled
  tokens run dense.
- LoRA on each targeted projection, always dense (unless `sparse_lora_branch`): forward
  2*T*r*(in + out); backward dB and dh = dy B^T (2*T*r*out each), dA (2*T*r*in) and, when the
  input needs a gradient, dx (2*T*r*in): 2x forward.
- Attention core: QK^T and AV over the full L x L score matrix (causality not exploited, as an
  eager or math-SDPA kernel computes it): forward 4*B*nh*L^2*hd; backward dS/dP/dQ/dK/dV, 2x.
  Identical for LoRA and SparseLoRA (q/k/v are scattered back to full width).
- LM head: 2*T*H*V forward, the same again for its input gradient. With
  `logits_on_output_only`, only the B*out positions whose next token is labelled.
- Estimator (SparseLoRA, forward only, no gradient), on the scored (real) tokens: rank-r
  x A B for gate and up, 2*T*r*(H + I) each ('per_token'; 'seq_mean' on B sequence means;
  'oracle' is the dense 2*T*H*I each; 'random' is free); q, k and v 2*T*r*(H + out) each
  ('norm'; 'oracle' dense; 'random' free).

Not counted: norms, RoPE, softmax, activations, residual adds, the loss's elementwise work,
gathers and scatters (memory traffic, not FLOPs), the optimizer, embeddings (a lookup).

Which input gradients exist: autograd computes one only where a trainable parameter lies
upstream. LoRA is in every layer, so every projection of layers >= 1 needs it; in layer 0 only
the projections after the first adapted one do (with LoRA on q/k/v/o: o, gate, up, down, but
not q/k/v, whose input is the frozen embedding). `grad_to_embeddings=True` counts them too (what
`enable_input_require_grads`, used with gradient checkpointing, causes). The rule is the same for
LoRA and SparseLoRA. No activation checkpointing is assumed (it would add a second forward).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparselora.config import SparseLoRAConfig, get_preset
from sparselora.engine.selection import num_kept
from sparselora.presets import PRESETS

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
}
STAGES_PER_LAYER = 4

COMPONENTS = ("attn_proj", "mlp_proj", "attn_core", "lora", "lm_head", "estimator")
COMPONENT_TITLES = {
    "attn_proj": "attn proj",
    "mlp_proj": "MLP proj",
    "attn_core": "attn core",
    "lora": "LoRA",
    "lm_head": "LM head",
    "estimator": "estimator",
}

# The paper's speed benchmark shapes: (sequence length, labelled tokens per sequence).
TASK_SHAPES: dict[str, tuple[int, int]] = {
    "math": (512, 128),
    "commonsense": (512, 3),
    "code": (1024, 512),
    "chat": (2048, 512),
}
# Preset name suffix -> the benchmark shape of its task.
PRESET_TASKS = {
    "csr": "commonsense",
    "math10k": "math",
    "code": "code",
    "chat": "chat",
    "glue": "commonsense",
    "gsm8k": "math",
}

TERA = 1e12


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

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its dict (config.json); head_dim and
        num_key_value_heads default as transformers does (H / nh, nh)."""
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
        num_heads = int(get("num_attention_heads"))
        return cls(
            hidden=int(get("hidden_size")),
            intermediate=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads") or num_heads),
            head_dim=int(get("head_dim") or get("hidden_size") // num_heads),
            vocab_size=int(get("vocab_size")),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each frozen projection of one decoder layer."""
        h, q, kv, i = self.hidden, self.num_heads * self.head_dim, self.kv_width, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


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
}
MODEL_ALIASES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
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


def preset_task(name: str) -> str:
    """The benchmark task whose shape a preset is counted at (llama3-8b-math10k -> math,
    smollm2-135m-gsm8k-fast -> math): the last dash-separated part that names a task."""
    for part in reversed(name.split(":")[0].split("-")):
        if part in PRESET_TASKS:
            return PRESET_TASKS[part]
    raise KeyError(f"preset {name!r} names no task of {sorted(PRESET_TASKS)}")


def _matmul(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _lora(tokens: int, d_in: int, d_out: int, rank: int, input_grad: bool) -> int:
    """Forward + backward of x A B with A (in, r), B (r, out) trainable."""
    forward = 2 * tokens * rank * (d_in + d_out)
    backward = 2 * tokens * rank * (2 * d_out + d_in)  # dB, dh = dy B^T, dA
    if input_grad:
        backward += 2 * tokens * rank * d_in  # dx = dh A^T
    return forward + backward


def _kept_projections(
    shape: ModelShape, ffn_sparsity: float | None, attn_sparsity: float | None
) -> dict[str, tuple[int, int]]:
    """(in, out) features each frozen projection computes on sparse tokens of one layer."""
    dims = shape.projections()
    h = shape.hidden
    if ffn_sparsity is not None:
        k = num_kept(shape.intermediate, ffn_sparsity)
        dims.update(gate_proj=(h, k), up_proj=(h, k), down_proj=(k, h))
    if attn_sparsity is not None:
        k_qk = num_kept(shape.kv_width, attn_sparsity)
        k_v = num_kept(shape.kv_width, attn_sparsity)
        g = shape.group
        dims.update(q_proj=(h, k_qk * g), k_proj=(h, k_qk), v_proj=(h, k_v), o_proj=(k_v * g, h))
    return dims


def _estimator(
    shape: ModelShape,
    config: SparseLoRAConfig,
    num_ffn: int,
    num_attn: int,
    scored: int,
    batch: int,
) -> int:
    """Forward-only cost of choosing the channels of `num_ffn` FFN and `num_attn` attention
    sparse layers on `scored` tokens (or `batch` sequence means)."""
    dims = shape.projections()
    rank = config.estimator_rank
    per_ffn = 0
    if config.ffn_criterion in ("per_token", "seq_mean"):
        points = scored if config.ffn_criterion == "per_token" else batch
        for proj in ("gate_proj", "up_proj"):
            d_in, d_out = dims[proj]
            per_ffn += 2 * points * min(rank, d_in, d_out) * (d_in + d_out)
    elif config.ffn_criterion == "oracle":
        per_ffn = sum(_matmul(scored, *dims[p]) for p in ("gate_proj", "up_proj"))
    per_attn = 0
    for proj in ("q_proj", "k_proj", "v_proj"):
        d_in, d_out = dims[proj]
        if config.attn_criterion == "norm":
            per_attn += 2 * scored * min(rank, d_in, d_out) * (d_in + d_out)
        elif config.attn_criterion == "oracle":
            per_attn += _matmul(scored, d_in, d_out)
    return per_ffn * num_ffn + per_attn * num_attn


def step_flops(
    shape: ModelShape,
    seq_len: int,
    out_tokens: int,
    batch: int = 1,
    lora_rank: int = 32,
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    config: SparseLoRAConfig | None = None,
    logits_on_output_only: bool = False,
    pad_tokens: int = 0,
    grad_to_embeddings: bool = False,
) -> dict[str, float]:
    """FLOPs of one training step (forward + backward) on B sequences of `seq_len` tokens.

    The last `out_tokens` of each sequence are labelled (they run dense); `pad_tokens` of each
    sequence are padding (computed like context tokens, not scored when the config excludes
    padding). `config=None` is plain LoRA. Returns {component: FLOPs} for COMPONENTS, and
    "total". See the module docstring for what each component holds.
    """
    if seq_len < 1 or batch < 1 or lora_rank < 1:
        raise ValueError("seq_len, batch and lora_rank must be >= 1")
    if not 0 <= out_tokens <= seq_len or not 0 <= pad_tokens <= seq_len - out_tokens:
        raise ValueError(
            f"need 0 <= out_tokens ({out_tokens}) and out_tokens + pad_tokens ({pad_tokens}) "
            f"<= seq_len ({seq_len})"
        )
    unknown = sorted(set(lora_targets) - set(STAGE))
    if unknown or not lora_targets:
        raise ValueError(f"lora_targets {unknown or '[]'}: choose from {list(STAGE)}")

    tokens = batch * seq_len
    ffn, attn = ({}, {}) if config is None else config.layer_sparsity(shape.num_layers)
    # Token sets of one sequence: the last `out_tokens` are labelled; position t is read by the
    # loss when t + 1 is labelled; the sparse set follows config.output_tokens.
    labelled = set(range(seq_len - out_tokens, seq_len))
    read = {t for t in range(seq_len - 1) if t + 1 in labelled}
    if config is None:
        sparse_set: set[int] = set()
    elif config.output_tokens == "sparse":
        sparse_set = set(range(seq_len))
    elif config.output_tokens == "dense_labelled":
        sparse_set = set(range(seq_len)) - labelled
    else:
        sparse_set = set(range(seq_len)) - read
    sparse_tokens = batch * len(sparse_set)
    if sparse_tokens == 0:
        ffn, attn = {}, {}
    # The last layer's skippable projections (q, o, FFN) run on read positions only.
    skip_last = config is not None and config.skip_unread_last_layer
    last_sparse = batch * len(sparse_set & read)
    last_dense = batch * len(read - sparse_set)
    detach = config is not None and config.detach_sparse_base
    sparse_lora = config is not None and config.sparse_lora_branch
    first_adapted = min(STAGE[p] for p in lora_targets)

    flops = dict.fromkeys(COMPONENTS, 0)
    full = shape.projections()
    core_forward = 4 * batch * shape.num_heads * seq_len**2 * shape.head_dim
    estimated_ffn = len(ffn)
    for layer in range(shape.num_layers):
        kept = _kept_projections(shape, ffn.get(layer), attn.get(layer))
        position = layer * STAGES_PER_LAYER
        last = skip_last and layer == shape.num_layers - 1
        if last and layer in ffn and last_sparse == 0:
            estimated_ffn -= 1  # no FFN token left sparse: no channels are chosen
        for proj, (d_in, d_out) in full.items():
            k_in, k_out = kept[proj]
            n_sparse, n_dense = sparse_tokens, tokens - sparse_tokens
            if last and proj in SKIPPED_LAST:
                n_sparse, n_dense = last_sparse, last_dense
            sparse = _matmul(n_sparse, k_in, k_out)
            forward = _matmul(n_dense, d_in, d_out) + sparse
            input_grad = grad_to_embeddings or position + STAGE[proj] > first_adapted
            backward = forward if input_grad else 0
            if input_grad and detach and layer in attn and proj in ATTN_PROJECTIONS:
                backward -= sparse  # the reference's cut gradient, for comparison
            flops["attn_proj" if proj in ATTN_PROJECTIONS else "mlp_proj"] += forward + backward
            if proj in lora_targets:
                lora_in, lora_out = (d_in, d_out)
                if sparse_lora and layer in ffn and proj in MLP_PROJECTIONS:
                    lora_in, lora_out = k_in, k_out
                flops["lora"] += _lora(n_dense, d_in, d_out, lora_rank, input_grad)
                flops["lora"] += _lora(n_sparse, lora_in, lora_out, lora_rank, input_grad)
        core_backward = grad_to_embeddings or position >= first_adapted
        flops["attn_core"] += core_forward * (3 if core_backward else 1)

    head_on_read = logits_on_output_only or (config is not None and config.labelled_logits)
    lm_tokens = batch * len(read) if head_on_read else tokens
    flops["lm_head"] = 2 * _matmul(lm_tokens, shape.hidden, shape.vocab_size)
    if config is not None:
        scored = batch * (seq_len - pad_tokens) if config.exclude_padding else tokens
        flops["estimator"] = _estimator(shape, config, estimated_ffn, len(attn), scored, batch)

    result = {name: float(value) for name, value in flops.items()}
    result["total"] = float(sum(flops.values()))
    return result


def compare(
    shape: ModelShape,
    seq_len: int,
    out_tokens: int,
    config: SparseLoRAConfig,
    exact_savings: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """LoRA and SparseLoRA step FLOPs on the same batch, and the predicted speedup.

    exact_savings=False counts channel sparsity alone (the paper's method): the config's
    labelled_logits and skip_unread_last_layer are turned off.
    """
    if not exact_savings:
        config = dataclasses.replace(config, labelled_logits=False, skip_unread_last_layer=False)
    lora = step_flops(shape, seq_len, out_tokens, config=None, **kwargs)
    sparse = step_flops(shape, seq_len, out_tokens, config=config, **kwargs)
    return {
        "seq_len": seq_len,
        "out_tokens": out_tokens,
        "lora_tflops": lora["total"] / TERA,
        "sparselora_tflops": sparse["total"] / TERA,
        "speedup": lora["total"] / sparse["total"],
        "lora": lora,
        "sparselora": sparse,
    }


def flops_table(
    presets: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """One row per (preset, task): each preset on its model's published config.

    presets: names in PRESETS (default: all). tasks: names in TASK_SHAPES (default: each
    preset's own task). kwargs go to `step_flops` (batch, lora_rank, lora_targets,
    logits_on_output_only, ...).
    """
    rows = []
    for name in PRESETS if presets is None else presets:
        preset = PRESETS[name]
        shape = PAPER_MODELS[preset.model]
        for task in [preset_task(name)] if tasks is None else tasks:
            seq_len, out_tokens = TASK_SHAPES[task]
            row = {"preset": name, "model": preset.model, "task": task}
            row.update(compare(shape, seq_len, out_tokens, get_preset(name), **kwargs))
            rows.append(row)
    return rows
