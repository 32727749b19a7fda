"""Composed step time: LoRA vs SparseLoRA on a model too large to train whole on this machine.

A whole LLaMA-3-8B training step does not fit a 24 GiB CPU machine in float32, so its parts are
timed one at a time and the step time is composed from the preset's layer pattern:

- one decoder layer of each distinct *kind* in the pattern, kind = (FFN sparsity, attention
  sparsity, last layer). The last layer is its own kind because the handle skips its q, o_proj
  and FFN on positions no loss reads (`skip_unread_last_layer`). Each layer is timed forward +
  backward on an input x (B, L, H) that requires grad (upstream layers carry LoRA), with a fixed
  random output gradient, inside `handle.batch(...)` so it runs as in a training forward;
- the final norm, LM head and loss on hidden states (B, L, H) that require grad: LoRA computes
  the logits at every position and transformers' causal-LM loss; SparseLoRA, with
  `labelled_logits`, only at the positions whose next token is labelled (`sparselora.engine.savings`);
- AdamW's step and `zero_grad` over LoRA parameters of the shapes of the FULL model (every
  layer's adapters, same rank and targets);
- the embedding lookup with the RoPE tables and the attention mask (forward only).

The parts live in a "parts model": `LlamaForCausalLM` of the model's shape with one decoder layer
per kind (the last kind last, so the handle treats it as the last layer) and random weights,
wrapped in PEFT LoRA and `apply_sparselora` with each kind's sparsity on its parts layer. Both
methods are timed back to back (LoRA under `handle.dense()`, i.e. PEFT LoRA itself; which runs
first alternates), every part in every repeat, so a drifting shared machine hits both alike.
Then, with medians per part,

    LoRA step       = inputs + sum over layers of t_lora(kind)   + head_lora   + optimizer
    SparseLoRA step = inputs + sum over layers of t_sparse(kind) + head_sparse + optimizer

where t_lora(kind) is the dense layer timed next to that kind's sparse layer. Before timing, one
untimed forward per kind checks that the sparse kinds really ran sparse (channels were chosen and
the output differs from LoRA's) and that dense layers did not change.

Assumptions: layers of the same kind cost the same (same shapes, and channel selection keeps a
fixed number of channels); the optimizer costs the same on adapters of the full model's shapes
whatever their values; layer 0 is timed with an input that requires grad, although in the whole
model its q/k/v input gradient is not computed (an overestimate of a small part of one layer's
backward); work between layers other than these parts (the Python of the model's forward) is
not counted. Batches are unpadded: L real tokens per row, the last `out` labelled.
`validate=True` also times the whole-model step (`sparselora bench`) on the same shape, config
and batch and reports composed / measured per method; use it on a model that fits whole.

The LLaMA-3-8B table, and the check of the composition on SmolLM2-135M:

    python -m sparselora.perf.composed --model llama3-8b --preset llama3-8b-math10k --shapes math \\
        --batch-size 1 --warmup 1 --steps 5 --output-dir runs/composed-llama3-8b
    python -m sparselora.perf.composed --model smollm2-135m --preset smollm2-135m-gsm8k \\
        --validate --output-dir runs/composed-smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sparselora.cli.app import configure_logging
from sparselora.config import ConfigError, SparseLoRAConfig
from sparselora.engine.flops import ModelShape, load_shape, step_flops
from sparselora.engine.handle import SparseLoRA
from sparselora.engine.savings import labelled_loss
from sparselora.perf.bench import (
    EMBEDDED_MODEL,
    METHODS,
    BenchConfig,
    BenchShape,
    add_lora_and_sparselora,
    add_shared_arguments,
    hardware_header,
    llama_config,
    parse_shape,
    run_benchmark,
    spread,
    step_fields,
    sync_device,
    synthetic_batch,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "llama3-8b"
DEFAULT_PRESET = "llama3-8b-math10k"
SHAPE_ALIASES = {EMBEDDED_MODEL: "smollm2-135m"}  # the embedded model has SmolLM2's shape
PART_COLUMNS = [
    "shape",
    "part",
    "label",
    "layers",
    "count",
    "ffn_sparsity",
    "attn_sparsity",
    "last_layer",
    "lora_median_s",
    "lora_min_s",
    "lora_max_s",
    "sparselora_median_s",
    "sparselora_min_s",
    "sparselora_max_s",
    "ratio",
    "lora_total_s",
    "sparselora_total_s",
    "sparselora_estimator_s",
]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ComposedConfig(BenchConfig):
    """What the composed benchmark measures: `BenchConfig`'s fields, with these differences."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata=_help(
            "A model alias or id of `sparselora.engine.flops` (e.g. llama3-8b, smollm2-135m), "
            f"'{EMBEDDED_MODEL}', or a directory with a LLaMA-style config.json. Only its shape "
            "is used: the parts model is a LLaMA of that shape with random weights."
        ),
    )
    random_weights: bool = field(
        default=True, metadata=_help("Always true: timing does not depend on the weights.")
    )
    sparselora: str = field(
        default=DEFAULT_PRESET,
        metadata=_help("A preset name, or a SparseLoRA config file (.yaml/.yml/.json)."),
    )
    estimator: str | None = field(
        default="svd",
        metadata=_help(
            "Estimator kind: 'svd' needs no calibration and its rank-r projection costs per step "
            "what 'whitened_svd''s does; null keeps the config's own."
        ),
    )
    padding: list[str] = field(
        default_factory=lambda: ["none"],
        metadata=_help("Always ['none']: every row is L real tokens."),
    )
    warmup_steps: int = field(default=1, metadata=_help("Untimed repeats of every part."))
    steps: int = field(default=5, metadata=_help("Timed repeats of every part, per method."))
    validate: bool = field(
        default=False,
        metadata=_help(
            "Also time the whole-model step (`sparselora bench`, same shape, config and batch) "
            "and report composed / measured per method. Only for a model that fits whole."
        ),
    )
    output_dir: str = field(
        default="runs/composed",
        metadata=_help("Folder for composed.json, composed.csv, composed_parts.csv, composed.md."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.random_weights is not True:
            raise ConfigError("random_weights must be true: the parts model has random weights")
        if self.padding != ["none"]:
            raise ConfigError(
                f"padding = {self.padding} is not allowed; the composed benchmark runs unpadded "
                "rows, choose ['none']"
            )
        if not isinstance(self.validate, bool):
            raise ConfigError(f"validate must be true or false, got {self.validate!r}")
        self.model_shape()

    def model_shape(self) -> ModelShape:
        """The full model's shape; a ConfigError names the accepted models."""
        try:
            return load_shape(SHAPE_ALIASES.get(self.model, self.model))
        except (ValueError, OSError) as err:
            raise ConfigError(f"model = {self.model!r}: {err}") from None


# -- layer kinds -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """What decides a decoder layer's cost: its FFN and attention sparsity (None: dense) and
    whether it is the last layer with the unread-position saving on."""

    ffn_sparsity: float | None
    attn_sparsity: float | None
    last: bool

    @property
    def label(self) -> str:
        blocks = []
        if self.ffn_sparsity is not None:
            blocks.append(f"FFN {self.ffn_sparsity:g}")
        if self.attn_sparsity is not None:
            blocks.append(f"attn {self.attn_sparsity:g}")
        text = " + ".join(blocks) or "dense"
        return f"{text}, last layer" if self.last else text

    @property
    def dense(self) -> bool:
        return self == LayerKind(None, None, False)


def layer_kinds(config: SparseLoRAConfig, num_layers: int) -> dict[LayerKind, list[int]]:
    """{kind: full-model layer indices}, kinds in order of first appearance (so the last-layer
    kind, when `skip_unread_last_layer` makes one, comes last)."""
    ffn, attn = config.layer_sparsity(num_layers)
    kinds: dict[LayerKind, list[int]] = {}
    for layer in range(num_layers):
        last = config.skip_unread_last_layer and layer == num_layers - 1
        kinds.setdefault(LayerKind(ffn.get(layer), attn.get(layer), last), []).append(layer)
    return kinds


def layer_spec(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parts_config(config: SparseLoRAConfig, kinds: Sequence[LayerKind]) -> SparseLoRAConfig:
    """`config` with parts layer i holding kind i's sparsity (other fields unchanged)."""
    return dataclasses.replace(
        config,
        ffn_sparsity={str(i): k.ffn_sparsity for i, k in enumerate(kinds) if k.ffn_sparsity},
        attn_sparsity={str(i): k.attn_sparsity for i, k in enumerate(kinds) if k.attn_sparsity},
    )


# -- parts -------------------------------------------------------------------------------


@dataclass
class Part:
    """One timed unit of a training step, `count` times in the full model.

    `run()` is the timed work: LoRA under `handle.dense()`, SparseLoRA otherwise. `reset()`
    (untimed, before each run) drops the gradients the previous run left, as `zero_grad` does.
    Layer parts also have `forward()`: the layer's output (B, L, H) on its input `x` (B, L, H)
    and the channels the handle chose in it, for `PartsModel.check_sparse_path`.
    """

    part: str
    label: str
    count: int
    run: Callable[[], None]
    reset: Callable[[], None]
    kind: LayerKind | None = None
    layers: list[int] = field(default_factory=list)
    forward: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    x: torch.Tensor | None = None


class PartsModel:
    """The parts model of `config` (one decoder layer per kind) wrapped in LoRA and SparseLoRA."""

    def __init__(
        self,
        config: ComposedConfig,
        sparse_config: SparseLoRAConfig,
        model_shape: ModelShape,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.config, self.model_shape, self.device = config, model_shape, device
        self.kinds = layer_kinds(sparse_config, model_shape.num_layers)
        shape = dataclasses.replace(model_shape, num_layers=len(self.kinds))
        torch.manual_seed(config.seed)
        with device:
            model = AutoModelForCausalLM.from_config(
                llama_config(shape), dtype=dtype, attn_implementation=config.attn_implementation
            )
        self.model = model.to(device).train()  # the LlamaForCausalLM inside the PEFT wrapper
        _, self.handle, self.setup_seconds = add_lora_and_sparselora(
            self.model,
            config,
            parts_config(sparse_config, list(self.kinds)),
            shape.vocab_size,
            parse_shape(config.shapes[0]),
            device,
        )

    def lora_parameter_shapes(self) -> list[tuple[torch.Size, torch.dtype]]:
        """Shapes and dtypes of the FULL model's trainable parameters: every decoder layer's
        adapters, as PEFT made them in parts layer 0 (all layers have the same shapes)."""
        layer = self.model.model.layers[0]
        one_layer = [(p.shape, p.dtype) for p in layer.parameters() if p.requires_grad]
        return one_layer * self.model_shape.num_layers

    def parts(self, bench_shape: BenchShape) -> list[Part]:
        """Every part of one training step on B unpadded rows of `bench_shape`, in step order."""
        from transformers.masking_utils import create_causal_mask

        config, device, model, body = self.config, self.device, self.model, self.model.model
        size = (config.batch_size, bench_shape.seq_len)
        batch = synthetic_batch(
            self.model_shape.vocab_size, config.batch_size, bench_shape, "none", config.seed, device
        )
        labels = batch["labels"]  # (B, L), the last `out` tokens of each row labelled
        position_ids = torch.arange(bench_shape.seq_len, device=device).unsqueeze(0)  # (1, L)
        generator = torch.Generator().manual_seed(config.seed)
        dtype = body.embed_tokens.weight.dtype

        def random_hidden() -> torch.Tensor:  # (B, L, H)
            return torch.randn(*size, self.model_shape.hidden, generator=generator).to(
                device, dtype
            )

        def inputs():
            embeds = body.embed_tokens(batch["input_ids"])  # (B, L, H)
            rope = body.rotary_emb(embeds, position_ids)  # (cos, sin), each (1, L, hd)
            mask = create_causal_mask(
                config=model.config,
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                cache=None,
                position_ids=position_ids,
            )  # None for SDPA (causal kernel), a (B, 1, L, L) mask for eager
            return rope, mask

        rope, mask = inputs()
        parts = [Part("inputs", "embedding, RoPE, mask", 1, inputs, lambda: None)]
        for index, (kind, layers) in enumerate(self.kinds.items()):
            layer = body.layers[index]
            x = random_hidden().requires_grad_()  # upstream layers carry LoRA
            grad_out = random_hidden()

            def forward(index=index, layer=layer, x=x):
                with self.handle.batch(size, labels=labels, device=device):
                    y = layer(
                        x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope
                    )  # (B, L, H)
                    return y, self.handle.last_selection().get(index, {})

            def run(forward=forward, grad_out=grad_out) -> None:
                y, _ = forward()
                y.backward(grad_out)

            def reset(layer=layer, x=x) -> None:
                x.grad = None
                for param in layer.parameters():
                    param.grad = None

            label = f"layer: {kind.label}"
            parts.append(Part("layer", label, len(layers), run, reset, kind, layers, forward, x))

        final_hidden = random_hidden().requires_grad_()

        def head() -> None:
            self.head_loss(final_hidden, labels).backward()

        def head_reset() -> None:
            final_hidden.grad = None

        parts.append(Part("lm_head", "final norm, LM head, loss", 1, head, head_reset))
        parts.append(self._optimizer_part())
        return parts

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and loss on hidden states (B, L, H), as the whole model computes
        them: at every position and with transformers' causal-LM loss under `handle.dense()`;
        else, with `labelled_logits`, only at the positions that predict a labelled token, as
        `sparselora.engine.savings.LabelledLogits` does."""
        model, handle = self.model, self.handle
        normed = model.model.norm(hidden)  # (B, L, H)
        if not (handle.config.labelled_logits and handle.exact_savings_active(model.training)):
            logits = model.lm_head(normed)  # (B, L, V)
            return model.loss_function(
                logits=logits, labels=labels, vocab_size=model.config.vocab_size
            )
        return labelled_loss(normed, labels, model.lm_head)[0]

    def _optimizer_part(self) -> Part:
        shapes = self.lora_parameter_shapes()
        generator = torch.Generator().manual_seed(self.config.seed)
        params = [
            torch.zeros(s, dtype=d, device=self.device, requires_grad=True) for s, d in shapes
        ]
        grads = [torch.randn(s, generator=generator).to(self.device, d) for s, d in shapes]
        optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate)
        self.lora_parameters = sum(p.numel() for p in params)

        def run() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def reset() -> None:
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad

        label = f"AdamW, {self.lora_parameters / 1e6:.3g}M LoRA parameters"
        return Part("optimizer", label, 1, run, reset)

    @torch.no_grad()
    def check_sparse_path(self, parts: Sequence[Part]) -> None:
        """Raise RuntimeError unless every sparse layer part chose its channels and changed the
        layer's output, and every dense one left it unchanged: no SparseLoRA time may be a dense
        layer's by mistake."""
        for part in parts:
            if part.forward is None:
                continue
            with self.handle.dense():
                dense_out, _ = part.forward()
            sparse_out, chosen = part.forward()
            # In the last layer every context token skips the FFN (output_tokens "dense"), so
            # no FFN channels are chosen there; its keys and values still run sparse.
            skipped_ffn = part.kind.last and self.handle.config.output_tokens == "dense"
            expected = {"gate_proj"} if part.kind.ffn_sparsity and not skipped_ffn else set()
            expected |= {"q_proj"} if part.kind.attn_sparsity is not None else set()
            changed = not torch.equal(dense_out, sparse_out)
            if not expected <= set(chosen) or changed == part.kind.dense:
                raise RuntimeError(
                    f"{part.label}: the SparseLoRA pass did not run as its kind says (channels "
                    f"chosen for {sorted(chosen)}, expected {sorted(expected)}; output "
                    f"{'changed' if changed else 'unchanged'} against LoRA)"
                )

    def remove(self) -> None:
        self.handle.remove()


# -- measurement and composition ---------------------------------------------------------


def _time_part(part: Part, method: str, handle: SparseLoRA, device: torch.device):
    """One timed run of `part` as `method`: (seconds, estimator seconds)."""
    part.reset()
    handle.stats.window()  # start this run's statistics window
    sync_device(device)
    start = time.perf_counter()
    with handle.dense() if method == "lora" else contextlib.nullcontext():
        part.run()
    sync_device(device)
    seconds = time.perf_counter() - start
    return seconds, handle.stats.window().get("estimator_seconds", 0.0)


def measure_parts(
    parts: Sequence[Part],
    handle: SparseLoRA,
    device: torch.device,
    warmup: int,
    steps: int,
    progress: bool = False,
    desc: str = "parts",
) -> list[dict[str, Any]]:
    """Time every part `warmup + steps` times per method; one row per part (see PART_COLUMNS)
    from the timed repeats. Every repeat runs every part as LoRA and as SparseLoRA back to back,
    which one first alternating between repeats, so drift and cache warmth hit both alike."""
    times = [{method: [] for method in METHODS} for _ in parts]
    estimator: list[list[float]] = [[] for _ in parts]
    schedule = [(r, i) for r in range(warmup + steps) for i in range(len(parts))]
    for repeat, i in tqdm(schedule, desc=desc, disable=not progress, leave=False):
        timed = repeat >= warmup
        for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:
            seconds, estimator_seconds = _time_part(parts[i], method, handle, device)
            if timed:
                times[i][method].append(seconds)
                if method == "sparselora":
                    estimator[i].append(estimator_seconds)
    return [part_row(p, t, e) for p, t, e in zip(parts, times, estimator, strict=True)]


def part_row(
    part: Part, times: Mapping[str, Sequence[float]], estimator: Sequence[float]
) -> dict[str, Any]:
    """Median, min and max seconds per method of one part, and its total in the full model."""
    lora, sparse = spread(times["lora"]), spread(times["sparselora"])
    kind = part.kind
    return {
        "part": part.part,
        "label": part.label,
        "layers": layer_spec(part.layers),
        "count": part.count,
        "ffn_sparsity": kind.ffn_sparsity if kind else None,
        "attn_sparsity": kind.attn_sparsity if kind else None,
        "last_layer": kind.last if kind else None,
        "lora_median_s": lora["median"],
        "lora_min_s": lora["min"],
        "lora_max_s": lora["max"],
        "sparselora_median_s": sparse["median"],
        "sparselora_min_s": sparse["min"],
        "sparselora_max_s": sparse["max"],
        "ratio": lora["median"] / sparse["median"],
        "lora_total_s": part.count * lora["median"],
        "sparselora_total_s": part.count * sparse["median"],
        "sparselora_estimator_s": statistics.median(estimator),
        "lora_times": list(times["lora"]),
        "sparselora_times": list(times["sparselora"]),
    }


def summarize(
    parts: Sequence[Mapping[str, Any]],
    flops: Mapping[str, float],
    tokens: int,
    measured: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The composed step of each method from its part rows: sum of count x median seconds.

    flops: {"lora", "sparselora"} step FLOPs (`step_flops`); tokens: tokens per step;
    measured: the whole-model `sparselora bench` row of the same shape, or None.
    """
    step = {m: sum(p["count"] * p[f"{m}_median_s"] for p in parts) for m in METHODS}
    estimator = sum(p["count"] * p["sparselora_estimator_s"] for p in parts)
    speedup = step["lora"] / step["sparselora"]
    predicted = flops["lora"] / flops["sparselora"]
    row = {
        "lora_step_s": step["lora"],
        "sparselora_step_s": step["sparselora"],
        "speedup": speedup,
        "predicted_speedup": predicted,
        "fraction_of_predicted": speedup / predicted,
        "lora_tflops": flops["lora"] / 1e12,
        "sparselora_tflops": flops["sparselora"] / 1e12,
        "estimator_s": estimator,
        "estimator_share": estimator / step["sparselora"],
        "lora_tokens_per_s": tokens / step["lora"],
        "sparselora_tokens_per_s": tokens / step["sparselora"],
        "measured_lora_step_s": None,
        "measured_sparselora_step_s": None,
        "measured_speedup": None,
        "lora_composed_over_measured": None,
        "sparselora_composed_over_measured": None,
    }
    if measured is not None:
        row.update(
            measured_lora_step_s=measured["lora_median_s"],
            measured_sparselora_step_s=measured["sparselora_median_s"],
            measured_speedup=measured["speedup"],
            lora_composed_over_measured=step["lora"] / measured["lora_median_s"],
            sparselora_composed_over_measured=step["sparselora"] / measured["sparselora_median_s"],
        )
    return row


def run_composed(config: ComposedConfig, progress: bool = False) -> dict[str, Any]:
    """Measure the parts of each shape and compose the steps; with `config.validate`, also the
    whole-model steps. Returns {"header", "rows" (one per shape), "parts" (per shape and part)}.

    Writes nothing; see `write_results`. `config.threads` applies for the duration of the call.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_composed(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run_composed(config: ComposedConfig, progress: bool) -> dict[str, Any]:
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    sparse_config = config.sparse_config()
    model_shape = config.model_shape()
    shapes = [parse_shape(s) for s in config.shapes]

    parts_model = PartsModel(config, sparse_config, model_shape, device, dtype)
    measured_parts = []
    try:
        for shape in shapes:
            parts = parts_model.parts(shape)
            parts_model.check_sparse_path(parts)
            rows = measure_parts(
                parts,
                parts_model.handle,
                device,
                config.warmup_steps,
                config.steps,
                progress,
                desc=f"{shape.name} parts",
            )
            measured_parts.append([{"shape": shape.name, **row} for row in rows])
            del parts
    finally:
        parts_model.remove()
    kinds = [
        {"parts_layer": i, "label": kind.label, "layers": layer_spec(layers)}
        for i, (kind, layers) in enumerate(parts_model.kinds.items())
    ]
    header = hardware_header(config, device, dtype)
    header.update(
        model=config.model,
        model_shape=dataclasses.asdict(model_shape),
        preset=sparse_config.preset or config.sparselora,
        sparselora_config=sparse_config.to_dict(),
        layer_kinds=kinds,
        lora_parameters=parts_model.lora_parameters,
        estimator_setup_s=parts_model.setup_seconds,
        composed_config=dataclasses.asdict(config),
    )
    del parts_model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    whole = run_benchmark(config, progress)["rows"] if config.validate else [None] * len(shapes)
    rows = []
    for shape, part_rows, measured in zip(shapes, measured_parts, whole, strict=True):
        flops = {
            method: step_flops(
                model_shape,
                shape.seq_len,
                shape.out_tokens,
                config.batch_size,
                lora_rank=config.lora_rank,
                lora_targets=config.lora_targets,
                config=sparse_config if method == "sparselora" else None,
            )["total"]
            for method in METHODS
        }
        row = {
            "model": config.model,
            "preset": header["preset"],
            "shape": shape.name,
            "seq_len": shape.seq_len,
            "out_tokens": shape.out_tokens,
            "batch_size": config.batch_size,
            "tokens": config.batch_size * shape.seq_len,
        }
        row.update(summarize(part_rows, flops, row["tokens"], measured))
        rows.append(row)
        logger.info(
            "%s: composed LoRA %.3f s, SparseLoRA %.3f s, speedup %.2fx (predicted %.2fx)",
            shape.name,
            row["lora_step_s"],
            row["sparselora_step_s"],
            row["speedup"],
            row["predicted_speedup"],
        )
    return {"header": header, "rows": rows, "parts": [p for ps in measured_parts for p in ps]}


# -- output ------------------------------------------------------------------------------


def _ms(row: Mapping[str, Any], method: str) -> str:
    median, low, high = (1e3 * row[f"{method}_{s}_s"] for s in ("median", "min", "max"))
    return f"{median:.1f} [{low:.1f}-{high:.1f}]"


def format_markdown(results: Mapping[str, Any]) -> str:
    """Composed step per shape (with the whole-model check when validated), then the parts of
    each shape: median ms [min-max] per method, LoRA / SparseLoRA ratio, totals in the model."""
    rows, parts = results["rows"], results["parts"]
    validated = any(row["measured_lora_step_s"] is not None for row in rows)
    header = [
        "shape (L, out)",
        "batch",
        "LoRA step s",
        "SparseLoRA step s",
        "speedup",
        "predicted",
        "of predicted",
        "estimator",
        "tokens/s",
    ]
    if validated:
        header += ["measured LoRA s", "measured SparseLoRA s", "measured speedup"]
        header += ["composed/measured LoRA", "composed/measured SparseLoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            f"{row['shape']} ({row['seq_len']}, {row['out_tokens']})",
            str(row["batch_size"]),
            f"{row['lora_step_s']:.3f}",
            f"{row['sparselora_step_s']:.3f}",
            f"{row['speedup']:.2f}x",
            f"{row['predicted_speedup']:.2f}x",
            f"{100 * row['fraction_of_predicted']:.0f}%",
            f"{100 * row['estimator_share']:.1f}%",
            f"{row['lora_tokens_per_s']:.0f} → {row['sparselora_tokens_per_s']:.0f}",
        ]
        if validated:
            cells += [
                f"{row['measured_lora_step_s']:.3f}",
                f"{row['measured_sparselora_step_s']:.3f}",
                f"{row['measured_speedup']:.2f}x",
                f"{row['lora_composed_over_measured']:.2f}",
                f"{row['sparselora_composed_over_measured']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    part_header = [
        "part",
        "layers",
        "count",
        "LoRA ms",
        "SparseLoRA ms",
        "ratio",
        "LoRA s x count",
        "SparseLoRA s x count",
    ]
    for row in rows:
        lines += ["", f"Parts of {row['shape']} ({row['seq_len']}, {row['out_tokens']}):", ""]
        lines += ["| " + " | ".join(part_header) + " |", "|" + "---|" * len(part_header)]
        for part in (p for p in parts if p["shape"] == row["shape"]):
            cells = [
                part["label"],
                part["layers"] or "-",
                str(part["count"]),
                _ms(part, "lora"),
                _ms(part, "sparselora"),
                f"{part['ratio']:.2f}x",
                f"{part['lora_total_s']:.3f}",
                f"{part['sparselora_total_s']:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """composed.json (everything), composed.csv (one row per shape), composed_parts.csv (one
    row per shape and part) and composed.md."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = results["header"]
    paths = {
        "json": out / "composed.json",
        "csv": out / "composed.csv",
        "parts_csv": out / "composed_parts.csv",
        "markdown": out / "composed.md",
    }
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    for key, rows, columns in (
        ("csv", results["rows"], list(results["rows"][0])),
        ("parts_csv", results["parts"], PART_COLUMNS),
    ):
        with paths[key].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    machine = header["gpu"] or header["cpu"]
    title = (
        f"Composed step · {Path(header['model']).name} · {Path(header['preset']).name} · "
        f"{machine} · {header['dtype']}, {header['threads']} threads · {header['date']}"
    )
    paths["markdown"].write_text(f"{title}\n\n{format_markdown(results)}\n")
    return paths


# -- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselora composed",
        description="Composed training-step time of SparseLoRA vs PEFT LoRA for a model too "
        "large to run whole: one layer per kind, LM head, optimizer, timed and summed.",
    )
    defaults = ComposedConfig()
    parser.add_argument(
        "--model", default=defaults.model, help="shape: alias, hub id of a paper model, or dir"
    )
    parser.add_argument(
        "--estimator",
        choices=["svd", "whitened_svd", "config"],
        default=defaults.estimator,
        help="estimator kind (default svd; 'config': the config's own)",
    )
    parser.add_argument(
        "--validate", action="store_true", help="also time whole-model steps (model must fit)"
    )
    add_shared_arguments(parser, defaults, "part")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the markdown tables, write JSON/CSV/markdown."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = ComposedConfig(
            model=args.model,
            sparselora=args.sparselora or DEFAULT_PRESET,
            estimator=None if args.estimator == "config" else args.estimator,
            shapes=args.shapes,
            **step_fields(args),
            validate=args.validate,
            output_dir=args.output_dir,
        )
        config.sparse_config()  # a bad preset or file fails before any model is built
        results = run_composed(config, progress=True)
    except (ConfigError, OSError) as err:
        parser.error(str(err))
    paths = write_results(results, config.output_dir)
    print(format_markdown(results))
    print(f"\nresults: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
