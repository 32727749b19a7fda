"""Composed step time: LoRA vs SparseLoRA on a model too large to train whole on this machine.

A whole LLaMA-3-8B training step does not fit a 24 GiB CPU machine in float32, so its parts
(`sparselora.perf.parts`: one decoder layer per kind of the preset's layer pattern, the LM head
and loss, the optimizer, the inputs) are timed one at a time and the step is composed from them.
Both methods are timed back to back (LoRA under `handle.dense()`, i.e. PEFT LoRA itself), every
part in every repeat, in the A B B A pair order of `common.pair_schedule`, so a drifting shared
machine hits both alike. Then, with medians per part,

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
See docs/METHOD.md (FLOPs accounting and the speed protocol) and docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from sparselora.config import ConfigError, doc
from sparselora.engine.flops import step_flops
from sparselora.engine.handle import SparseLoRA
from sparselora.engine.shapes import ModelShape, load_shape
from sparselora.perf.bench import BenchConfig, BenchRow, run_benchmark
from sparselora.perf.common import (
    BenchShape,
    MeasureConfig,
    Timing,
    hardware_header,
    pair_schedule,
    parse_shape,
    timed,
    torch_threads,
)
from sparselora.perf.parts import Part, PartsModel, layer_spec
from sparselora.recipes.loading import EMBEDDED_MODEL, METHODS, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

SHAPE_ALIASES = {EMBEDDED_MODEL: "smollm2-135m"}  # the embedded model has SmolLM2's shape


@dataclass
class ComposedConfig(MeasureConfig):
    """What the composed benchmark measures: the shared fields of `MeasureConfig` (with these
    defaults), and `validate`."""

    model: str = field(
        default="llama3-8b",
        metadata=doc(
            "A model alias or id of `sparselora.engine.flops` (e.g. llama3-8b, smollm2-135m), "
            f"'{EMBEDDED_MODEL}', or a directory with a LLaMA-style config.json. Only its shape "
            "is used: the parts model is a LLaMA of that shape with random weights."
        ),
    )
    sparselora: str = field(
        default="llama3-8b-math10k",
        metadata=doc("A preset name, or a SparseLoRA config file (.yaml/.yml/.json)."),
    )
    estimator: str = field(
        default="svd",
        metadata=doc(
            "Estimator kind: 'svd' needs no calibration and its rank-r projection costs per step "
            "what 'whitened_svd''s does; 'config' keeps the SparseLoRA config's own."
        ),
    )
    warmup_steps: int = field(default=1, metadata=doc("Untimed repeats of every part."))
    steps: int = field(default=5, metadata=doc("Timed repeats of every part, per method."))
    output_dir: str = field(
        default="runs/composed",
        metadata=doc("Folder for composed.json, composed.csv, composed_parts.csv, composed.md."),
    )
    validate: bool = field(
        default=False,
        metadata=doc(
            "Also time the whole-model step (`sparselora bench`, same shape, config and batch) "
            "and report composed / measured per method. Only for a model that fits whole."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.validate, bool):
            raise ConfigError(f"validate must be true or false, got {self.validate!r}")
        self.model_shape()

    def model_shape(self) -> ModelShape:
        """The full model's shape; a ConfigError names the accepted models."""
        try:
            return load_shape(SHAPE_ALIASES.get(self.model, self.model))
        except (ValueError, OSError) as err:
            raise ConfigError(f"model = {self.model!r}: {err}") from None

    def bench_config(self) -> BenchConfig:
        """The whole-model benchmark of `validate`: same fields, random weights, unpadded."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(MeasureConfig)}
        return BenchConfig(**shared, random_weights=True, padding=["none"])


# -- rows ----------------------------------------------------------------------------------


@dataclass
class PartTiming(Timing):
    """One method's seconds of one part, and its total in the full model."""

    total_s: float  # count x median_s
    times: list[float]  # timed seconds, in run order


@dataclass
class PartRow:
    """One part of one shape: what it is, how often the full model runs it, its timings."""

    shape: str
    part: str  # inputs, layer, lm_head or optimizer
    label: str
    layers: str  # the full model's layers of this kind, e.g. "3-13,20" ("" for other parts)
    count: int
    ffn_sparsity: float | None
    attn_sparsity: float | None
    last_layer: bool | None
    lora: PartTiming
    sparselora: PartTiming
    ratio: float  # LoRA median / SparseLoRA median
    sparselora_estimator_s: float  # median over the SparseLoRA runs


@dataclass
class ComposedStep:
    """One method's composed step."""

    step_s: float  # sum over parts of count x median seconds
    tflops: float  # FLOPs-predicted step, in TFLOPs
    tokens_per_s: float


@dataclass
class ComposedRow:
    """The composed step of both methods at one shape; `measured_*` only with `validate`."""

    model: str
    preset: str
    shape: str
    seq_len: int
    out_tokens: int
    batch_size: int
    tokens: int
    lora: ComposedStep
    sparselora: ComposedStep
    speedup: float
    predicted_speedup: float
    fraction_of_predicted: float
    estimator_s: float  # sum over parts of count x median estimator seconds
    estimator_share: float  # of the composed SparseLoRA step
    measured_lora_step_s: float | None = None
    measured_sparselora_step_s: float | None = None
    measured_speedup: float | None = None
    lora_composed_over_measured: float | None = None
    sparselora_composed_over_measured: float | None = None


@dataclass
class ComposedResults:
    """The machine and settings (`header`), one row per shape, one per shape and part."""

    header: dict[str, Any]
    rows: list[ComposedRow]
    parts: list[PartRow]


def part_row(
    shape: str, part: Part, times: Mapping[str, Sequence[float]], estimator: Sequence[float]
) -> PartRow:
    """Summarise `part`'s timed seconds {method: [...]} and SparseLoRA estimator seconds."""
    timing = {
        m: PartTiming.of(
            times[m], total_s=part.count * statistics.median(times[m]), times=list(times[m])
        )
        for m in METHODS
    }
    kind = part.kind
    return PartRow(
        shape=shape,
        part=part.part,
        label=part.label,
        layers=layer_spec(part.layers),
        count=part.count,
        ffn_sparsity=kind.ffn_sparsity if kind else None,
        attn_sparsity=kind.attn_sparsity if kind else None,
        last_layer=kind.last if kind else None,
        lora=timing["lora"],
        sparselora=timing["sparselora"],
        ratio=timing["lora"].median_s / timing["sparselora"].median_s,
        sparselora_estimator_s=statistics.median(estimator),
    )


def compose(
    shape: BenchShape,
    batch_size: int,
    parts: Sequence[PartRow],
    flops: Mapping[str, float],
    measured: BenchRow | None = None,
    model: str = "",
    preset: str = "",
) -> ComposedRow:
    """The composed step of each method: the sum over `parts` of count x median seconds.

    flops: {method: predicted step FLOPs}; measured: the whole-model row of the same shape.
    """
    tokens = batch_size * shape.seq_len
    step = {m: sum(p.count * getattr(p, m).median_s for p in parts) for m in METHODS}
    estimator = sum(p.count * p.sparselora_estimator_s for p in parts)
    speedup = step["lora"] / step["sparselora"]
    predicted = flops["lora"] / flops["sparselora"]
    methods = {m: ComposedStep(step[m], flops[m] / 1e12, tokens / step[m]) for m in METHODS}
    row = ComposedRow(
        model=model,
        preset=preset,
        shape=shape.name,
        seq_len=shape.seq_len,
        out_tokens=shape.out_tokens,
        batch_size=batch_size,
        tokens=tokens,
        lora=methods["lora"],
        sparselora=methods["sparselora"],
        speedup=speedup,
        predicted_speedup=predicted,
        fraction_of_predicted=speedup / predicted,
        estimator_s=estimator,
        estimator_share=estimator / step["sparselora"],
    )
    if measured is not None:
        row.measured_lora_step_s = measured.lora.median_s
        row.measured_sparselora_step_s = measured.sparselora.median_s
        row.measured_speedup = measured.speedup
        row.lora_composed_over_measured = step["lora"] / measured.lora.median_s
        row.sparselora_composed_over_measured = step["sparselora"] / measured.sparselora.median_s
    return row


# -- measurement ---------------------------------------------------------------------------


def _time_part(part: Part, method: str, handle: SparseLoRA, device: torch.device):
    """One timed run of `part` as `method`: (seconds, estimator seconds)."""
    part.reset()
    handle.stats.window()  # start this run's statistics window
    with handle.dense() if method == "lora" else contextlib.nullcontext():
        _, seconds = timed(part.run, device)
    return seconds, handle.stats.window().get("estimator_seconds", 0.0)


def measure_parts(
    parts: Sequence[Part],
    handle: SparseLoRA,
    device: torch.device,
    warmup: int,
    steps: int,
    shape: str,
    progress: bool = False,
) -> list[PartRow]:
    """Time every part `warmup + steps` times per method; one row per part from the timed
    repeats. Each repeat (a pair of `pair_schedule`) runs every part as LoRA and as SparseLoRA
    back to back, in that pair's order."""
    times = [{method: [] for method in METHODS} for _ in parts]
    estimator: list[list[float]] = [[] for _ in parts]
    schedule = [
        (is_timed, order, i)
        for is_timed, order in pair_schedule(warmup, steps)
        for i in range(len(parts))
    ]
    desc = f"{shape} parts"
    for is_timed, order, i in tqdm(schedule, desc=desc, disable=not progress, leave=False):
        for method in order:
            seconds, estimator_seconds = _time_part(parts[i], method, handle, device)
            if is_timed:
                times[i][method].append(seconds)
                if method == "sparselora":
                    estimator[i].append(estimator_seconds)
    return [part_row(shape, p, t, e) for p, t, e in zip(parts, times, estimator, strict=True)]


def run_composed(config: ComposedConfig, progress: bool = False) -> ComposedResults:
    """Measure the parts of each shape and compose the steps; with `config.validate`, also the
    whole-model steps. Writes nothing (see `perf.report`); `config.threads` applies for the
    duration of the call."""
    with torch_threads(config.threads):
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        sparse_config = config.sparse_config()
        preset = sparse_config.preset or config.sparselora
        model_shape = config.model_shape()
        shapes = [parse_shape(s) for s in config.shapes]

        parts_model = PartsModel(config, sparse_config, model_shape, device, dtype)
        part_rows: list[list[PartRow]] = []
        try:
            for shape in shapes:
                parts = parts_model.parts(shape)
                parts_model.check_sparse_path(parts)
                part_rows.append(
                    measure_parts(
                        parts,
                        parts_model.handle,
                        device,
                        config.warmup_steps,
                        config.steps,
                        shape.name,
                        progress,
                    )
                )
                del parts
        finally:
            parts_model.remove()
        header = hardware_header(device)
        header.update(
            dtype=str(dtype).removeprefix("torch."),
            model=config.model,
            model_shape=dataclasses.asdict(model_shape),
            preset=preset,
            sparselora_config=sparse_config.to_dict(),
            layer_kinds=[
                {"parts_layer": i, "label": kind.label, "layers": layer_spec(layers)}
                for i, (kind, layers) in enumerate(parts_model.kinds.items())
            ],
            lora_parameters=parts_model.lora_parameters,
            estimator_setup_s=parts_model.setup_seconds,
            composed_config=dataclasses.asdict(config),
        )
        del parts_model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        whole: Sequence[BenchRow | None] = [None] * len(shapes)
        if config.validate:
            whole = run_benchmark(config.bench_config(), progress).rows
    rows = []
    for shape, parts_of_shape, measured in zip(shapes, part_rows, whole, strict=True):
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
        row = compose(
            shape, config.batch_size, parts_of_shape, flops, measured, config.model, preset
        )
        rows.append(row)
        logger.info(
            "%s: composed LoRA %.3f s, SparseLoRA %.3f s, speedup %.2fx (predicted %.2fx)",
            shape.name,
            row.lora.step_s,
            row.sparselora.step_s,
            row.speedup,
            row.predicted_speedup,
        )
    return ComposedResults(header, rows, [p for ps in part_rows for p in ps])
