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
  Identical for LoRA and SparseLoRA (q/k/v are scattered back to full width), except in the
  last layer with `skip_unread_last_layer`: only the n query rows some loss reads (n = the
  positions whose next token is labelled, the same in every sequence here), against all L
  keys: 4*B*nh*n*L*hd forward (`engine/attention.py`; all L rows when n is 0 or L; assumes
  no attention dropout and an `sdpa` or `eager` core, which that shortcut needs).
- LM head: 2*T*H*V forward, the same again for its input gradient. With
  `logits_on_output_only`, only the B*out positions whose next token is labelled.
- Gemma 4's per-layer inputs, counted under "MLP proj" (frozen, dense, every token): per
  layer a gate H -> P and a projection P -> H, forward and input gradient; once per step the
  projection of the embeddings H -> n_layers*P, forward (plus its input gradient with
  `grad_to_embeddings`). P = `hidden_size_per_layer_input`.
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

Layers may differ (Gemma 4, `ModelShape.layers`): head dim and KV heads of full-attention
layers, FFN width (double-wide MLPs), and layers with no k/v projections of their own (they
reuse an earlier layer's keys and values) or no v projection (the keys are the values). Such
layers take no attention sparsity and, as the last layer, skip only their FFN's and attention
core's unread rows.

Fused and hybrid layouts (`ModelShape.modules`): Phi-3 computes q/k/v in one `qkv_proj` and
gate/up in one `gate_up_proj`. The frozen FLOPs are those of the separate projections (the
kept rows of each, in one matmul), a LoRA adapter is the fused module's (one A, one B of the
fused width; an adapter named after one of its projections counts as the fused module's),
and in the last layer q runs on every token (k and v share its matmul). Qwen3.5's q_proj also
computes a per-head output gate, nh*hd rows that run dense on every token q runs on (its LoRA
has the doubled width; its estimator the query's). Qwen3.5's Gated DeltaNet layers (`layer_types`
"linear_attention") have no q/k/v/o: their projections in_proj_qkv (H -> 2*nk*dk + nv*dv),
in_proj_z (H -> nv*dv), in_proj_b, in_proj_a (H -> nv) and out_proj (nv*dv -> H) are counted
like frozen attention projections (dense, under "attn proj", LoRA where targeted); their core
(causal convolution and chunked gated delta rule) is not counted: its cost depends on the
kernel (flash-linear-attention or transformers' PyTorch fallback, chunk padding), not on the
shapes alone, and it is the same for LoRA and SparseLoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sparselora.config import SparseLoRAConfig, get_preset
from sparselora.engine.selection import num_kept
from sparselora.engine.shapes import (
    ATTN_PROJECTIONS,
    DEFAULT_LORA_TARGETS,
    MLP_PROJECTIONS,
    PAPER_MODELS,
    SKIPPED_LAST,
    STAGE,
    STAGES_PER_LAYER,
    TASK_SHAPES,
    ModelShape,
)
from sparselora.presets import PRESETS

COMPONENTS = ("attn_proj", "mlp_proj", "attn_core", "lora", "lm_head", "estimator")
COMPONENT_TITLES = {
    "attn_proj": "attn proj",
    "mlp_proj": "MLP proj",
    "attn_core": "attn core",
    "lora": "LoRA",
    "lm_head": "LM head",
    "estimator": "estimator",
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
    shape: ModelShape, layer: int, ffn_sparsity: float | None, attn_sparsity: float | None
) -> dict[str, tuple[int, int]]:
    """(in, out) features each frozen projection computes on sparse tokens of `layer`."""
    dims = shape.projections(layer)
    geometry = shape.layer(layer)
    h = shape.hidden
    if ffn_sparsity is not None:
        k = num_kept(geometry.intermediate, ffn_sparsity)
        dims.update(gate_proj=(h, k), up_proj=(h, k), down_proj=(k, h))
    if attn_sparsity is not None:
        k_qk = num_kept(geometry.kv_width, attn_sparsity)
        k_v = num_kept(geometry.kv_width, attn_sparsity)
        g = shape.num_heads // geometry.num_kv_heads
        dims.update(q_proj=(h, k_qk * g), k_proj=(h, k_qk), v_proj=(h, k_v), o_proj=(k_v * g, h))
    return dims


def _estimator(
    dims: Mapping[str, tuple[int, int]],
    config: SparseLoRAConfig,
    ffn: bool,
    attn: bool,
    scored: int,
    batch: int,
) -> int:
    """Forward-only cost of choosing the FFN (`ffn`) and attention (`attn`) channels of one
    layer of projection sizes `dims` on `scored` tokens (or `batch` sequence means)."""
    rank = config.estimator_rank
    cost = 0
    if ffn and config.ffn_criterion in ("per_token", "seq_mean"):
        points = scored if config.ffn_criterion == "per_token" else batch
        for proj in ("gate_proj", "up_proj"):
            d_in, d_out = dims[proj]
            cost += 2 * points * min(rank, d_in, d_out) * (d_in + d_out)
    elif ffn and config.ffn_criterion == "oracle":
        cost += sum(_matmul(scored, *dims[p]) for p in ("gate_proj", "up_proj"))
    for proj in ("q_proj", "k_proj", "v_proj") if attn else ():
        d_in, d_out = dims[proj]
        if config.attn_criterion == "norm":
            cost += 2 * scored * min(rank, d_in, d_out) * (d_in + d_out)
        elif config.attn_criterion == "oracle":
            cost += _matmul(scored, d_in, d_out)
    return cost


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

    def adapted(module: str, parts: tuple[str, ...]) -> bool:
        return module in lora_targets or any(p in lora_targets for p in parts)

    first_adapted = min(
        (
            layer * STAGES_PER_LAYER + STAGE[parts[0]]
            for layer in range(shape.num_layers)
            for module, (_, parts) in shape.modules(layer).items()
            if adapted(module, parts)
        ),
        default=None,
    )
    if first_adapted is None:
        raise ValueError(f"lora_targets {list(lora_targets)} name no module of this model")

    tokens = batch * seq_len
    ffn, attn = ({}, {}) if config is None else config.layer_sparsity(shape.num_layers)
    refused = sorted(i for i in attn if shape.layer(i).kv != "own")
    if refused:
        raise ValueError(
            f"attn_sparsity names layer(s) {refused}, whose keys and values are not their own "
            "(shared with an earlier layer, or keys used as values); remove them"
        )
    linear = sorted(set(attn) & set(shape.linear_layers))
    if linear:
        raise ValueError(
            f"attn_sparsity names layer(s) {linear}, which are linear attention (Gated "
            "DeltaNet): no q/k/v/o to sparsify; remove them"
        )
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
    # The last layer's skippable projections (q, o, FFN) and its attention core's query rows
    # run on read positions only.
    skip_last = config is not None and config.skip_unread_last_layer
    core_rows = len(read) if 0 < len(read) < seq_len else seq_len
    last_sparse = batch * len(sparse_set & read)
    last_dense = batch * len(read - sparse_set)
    detach = config is not None and config.detach_sparse_base
    sparse_lora = config is not None and config.sparse_lora_branch
    scored = (
        tokens
        if config is not None and not config.exclude_padding
        else batch * (seq_len - pad_tokens)
    )

    flops = dict.fromkeys(COMPONENTS, 0)
    for layer in range(shape.num_layers):
        geometry = shape.layer(layer)
        full = shape.projections(layer)
        kept = _kept_projections(shape, layer, ffn.get(layer), attn.get(layer))
        position = layer * STAGES_PER_LAYER
        last = skip_last and layer == shape.num_layers - 1
        modules = shape.modules(layer)
        # A layer without its own keys and values skips only its FFN (no q/o of its own); a
        # module skips only if every projection it computes may (Phi-3's qkv_proj may not).
        own = geometry.kv == "own" and layer not in shape.linear_layers
        may_skip = SKIPPED_LAST if own else MLP_PROJECTIONS
        skipped = {p for _, parts in modules.values() if set(parts) <= set(may_skip) for p in parts}
        if config is not None:
            chooses_ffn = layer in ffn and not (last and last_sparse == 0)  # else none left
            flops["estimator"] += _estimator(
                full, config, chooses_ffn, layer in attn, scored, batch
            )
        for proj, (d_in, d_out) in full.items():
            k_in, k_out = kept[proj]
            extra = shape.query_gate_rows(proj)  # rows computed densely beside the projection
            d_out, k_out = d_out + extra, k_out + extra
            n_sparse, n_dense = sparse_tokens, tokens - sparse_tokens
            if last and proj in skipped:
                n_sparse, n_dense = last_sparse, last_dense
            sparse = _matmul(n_sparse, k_in, k_out)
            forward = _matmul(n_dense, d_in, d_out) + sparse
            input_grad = grad_to_embeddings or position + STAGE[proj] > first_adapted
            backward = forward if input_grad else 0
            if input_grad and detach and layer in attn and proj in ATTN_PROJECTIONS:
                backward -= sparse  # the reference's cut gradient, for comparison
            flops["mlp_proj" if proj in MLP_PROJECTIONS else "attn_proj"] += forward + backward
        for module, ((d_in, d_out), parts) in modules.items():
            if not adapted(module, parts):
                continue
            n_sparse, n_dense = sparse_tokens, tokens - sparse_tokens
            if last and parts[0] in skipped:
                n_sparse, n_dense = last_sparse, last_dense
            input_grad = grad_to_embeddings or position + STAGE[parts[0]] > first_adapted
            lora_in, lora_out = (d_in, d_out)
            if sparse_lora and layer in ffn and parts[0] in MLP_PROJECTIONS:
                lora_in, lora_out = kept[parts[0]][0], sum(kept[p][1] for p in parts)
            flops["lora"] += _lora(n_dense, d_in, d_out, lora_rank, input_grad)
            flops["lora"] += _lora(n_sparse, lora_in, lora_out, lora_rank, input_grad)
        rows = core_rows if last else seq_len  # query rows of the core, against seq_len keys
        core_forward = 4 * batch * shape.num_heads * rows * seq_len * geometry.head_dim
        if layer in shape.linear_layers:
            core_forward = 0  # the Gated DeltaNet core is not counted (module docstring)
        core_backward = grad_to_embeddings or position >= first_adapted
        flops["attn_core"] += core_forward * (3 if core_backward else 1)
        # Per-layer input gate and projection: after the FFN, so always an input gradient.
        flops["mlp_proj"] += 2 * 2 * _matmul(tokens, shape.hidden, shape.per_layer_input)

    passes = 2 if grad_to_embeddings else 1  # the per-layer inputs' projection of the embeddings
    per_layer_inputs = shape.num_layers * shape.per_layer_input
    flops["mlp_proj"] += passes * _matmul(tokens, shape.hidden, per_layer_inputs)
    head_on_read = logits_on_output_only or (config is not None and config.labelled_logits)
    lm_tokens = batch * len(read) if head_on_read else tokens
    flops["lm_head"] = 2 * _matmul(lm_tokens, shape.hidden, shape.vocab_size)

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
