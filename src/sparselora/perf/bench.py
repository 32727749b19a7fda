"""Measured training-step speed of SparseLoRA against PEFT LoRA (`sparselora bench`).

The speed protocol of docs/METHOD.md (FLOPs accounting and the speed protocol). One PEFT LoRA
model and one SparseLoRA handle: LoRA steps run under `handle.dense()` (the wrapped forwards call
the original modules, so the step is PEFT LoRA's own), SparseLoRA steps run sparse from step 0
(the estimator is fitted before the first step). For each shape (L, out) and padding mode, both
methods train end to end (forward, backward, AdamW step, zero_grad) on the SAME synthetic batch:
random token ids, labels -100 except the last `out` tokens of each row. Steps run in pairs,
A B B A A B ... (`common.pair_schedule`), warm-up pairs untimed.

Same state for both methods: the trainable (LoRA) parameters are snapshotted once and restored
before every step (outside the timed region), and each method has its own AdamW. Every step of
a method therefore repeats the same computation from the same weights; only the optimizer's
moments advance, which does not change its cost.

Reported per (shape, padding) row (`BenchRow`): median, min and max step seconds per method;
measured speedup (median LoRA / median SparseLoRA) and the paired speedup (median over pairs of
the two steps' ratio, robust to drift); the FLOPs-predicted speedup (`engine.flops.step_flops`
on the same shape, padding and config) and measured / predicted; the estimator's share of the
sparse step (host-side seconds of channel selection, `handle.stats`); the end-to-end speedup of
a training run whose schedule runs the `start_step` fraction (and the steps after `end_step`)
dense; real tokens per second; memory: on CUDA the peak allocated bytes of a step, and on every
device the bytes autograd saves for backward in one forward (a probe step, untimed). CPU peak
memory is not reported: PyTorch's CPU allocator has no peak counter and process RSS does not
drop when the allocator keeps freed blocks, so it cannot be attributed to one method.
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
from torch import nn
from tqdm import tqdm

from sparselora.config import ConfigError, SparseLoRAConfig, check_choice, doc
from sparselora.engine.flops import step_flops
from sparselora.engine.handle import SparseLoRA
from sparselora.engine.shapes import ModelShape
from sparselora.perf.common import (
    MIB,
    BenchShape,
    MeasureConfig,
    Timing,
    add_lora_and_sparselora,
    hardware_header,
    pair_schedule,
    parse_shape,
    saved_activation_bytes,
    synthetic_batch,
    timed,
    torch_threads,
)
from sparselora.recipes.loading import (
    EMBEDDED_MODEL,
    GEMMA3_MODEL,
    METHODS,
    load_model,
    resolve_device,
)

logger = logging.getLogger(__name__)

PADDING_MODES = ("none", "left")


@dataclass
class BenchConfig(MeasureConfig):
    """What `sparselora bench` measures: the shared fields of `MeasureConfig`, and these."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata=doc(
            f"'{EMBEDDED_MODEL}' or '{GEMMA3_MODEL}' (embedded), a Hugging Face id or a local "
            "directory; with random_weights also a model alias of `sparselora.engine.shapes` "
            "(e.g. llama3-8b)."
        ),
    )
    output_dir: str = field(
        default="runs/bench",
        metadata=doc("Folder for bench.json, bench.csv, bench.md and bench.png."),
    )
    random_weights: bool = field(
        default=False,
        metadata=doc("Build the model from its config with random weights (no checkpoint)."),
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=doc(
            "QLoRA: the base projections in bitsandbytes nf4 (double-quantized scales), as "
            "model.load_in_4bit of `sparselora train`; LoRA is then QLoRA and SparseLoRA runs on "
            "the 4-bit weights. Not with random_weights."
        ),
    )
    padding: list[str] = field(
        default_factory=lambda: list(PADDING_MODES),
        metadata=doc(
            "'none': every row is L real tokens; 'left': each row has a random real length "
            "in [out+1, L] and is left-padded to L (the reference pads every batch so)."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.padding = list(dict.fromkeys(self.padding))
        check_choice("padding", self.padding, PADDING_MODES)
        for name in ("random_weights", "load_in_4bit"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.random_weights and self.load_in_4bit:
            raise ConfigError("load_in_4bit needs a checkpoint: set random_weights=false")

    def base_model(self, device: torch.device) -> nn.Module:
        """The model to measure, on `device`, in train mode, before LoRA is added."""
        return load_model(
            self.model,
            self.dtype,
            self.attn_implementation,
            device=device,
            random_weights=self.random_weights,
            seed=self.seed,
            load_in_4bit=self.load_in_4bit,
        ).train()


# -- rows ----------------------------------------------------------------------------------


@dataclass
class Step:
    """One timed training step of one method."""

    seconds: float
    loss: float
    estimator_seconds: float  # host-side channel selection within the step
    ffn_kept: float | None  # mean kept fraction of FFN channels (None: no sparse FFN ran)
    attn_kept: float | None
    peak_bytes: int | None  # CUDA peak allocated bytes of the step; None on the CPU


@dataclass
class MethodResult(Timing):
    """One method's part of a `BenchRow`: step seconds (median, min, max) and the rest."""

    tflops: float  # FLOPs-predicted step, in TFLOPs
    tokens_per_s: float  # real tokens per median step second
    peak_mib: float | None  # CUDA peak of the timed steps; None on the CPU
    saved_mib: float  # bytes autograd saves for backward in one forward
    loss: float  # median over the timed steps
    step_times: list[float]  # timed step seconds, in run order
    losses: list[float]


@dataclass
class BenchRow:
    """The result of one (shape, padding) row; per-method figures in `lora` and `sparselora`."""

    shape: str
    seq_len: int
    out_tokens: int
    padding: str
    batch_size: int
    real_tokens: int
    pad_fraction: float
    lora: MethodResult
    sparselora: MethodResult
    speedup: float  # median LoRA step / median SparseLoRA step
    paired_speedup: float  # median over pairs of LoRA step / SparseLoRA step
    predicted_speedup: float  # LoRA FLOPs / SparseLoRA FLOPs
    fraction_of_predicted: float  # speedup / predicted_speedup
    end_to_end_speedup: float  # of a run with `dense_step_fraction` of its steps dense
    dense_step_fraction: float
    estimator_s: float  # median over SparseLoRA steps
    estimator_share: float  # estimator_s / median SparseLoRA step
    ffn_kept: float | None
    attn_kept: float | None
    model: str
    preset: str


@dataclass
class BenchResults:
    """The machine and settings (`header`, a JSON-ready dict) and one row per (shape, padding)."""

    header: dict[str, Any]
    rows: list[BenchRow]


def bench_row(
    shape: BenchShape,
    padding: str,
    batch_size: int,
    real_tokens: int,
    steps: Mapping[str, Sequence[Step]],
    saved_bytes: Mapping[str, int],
    flops: Mapping[str, float],
    dense_fraction: float,
    model: str = "",
    preset: str = "",
) -> BenchRow:
    """Summarise the timed steps of both methods on one batch.

    steps: {method: timed steps, in run order, the i-th of each method from the same pair};
    saved_bytes: {method: bytes saved for backward}; flops: {method: predicted step FLOPs};
    dense_fraction: the fraction of a run's steps the schedule keeps dense.
    """
    times = {m: [s.seconds for s in steps[m]] for m in METHODS}
    timing = {m: Timing.of(times[m]) for m in METHODS}
    peaks = {m: [s.peak_bytes for s in steps[m] if s.peak_bytes is not None] for m in METHODS}
    methods = {
        m: MethodResult.of(
            times[m],
            tflops=flops[m] / 1e12,
            tokens_per_s=real_tokens / timing[m].median_s,
            peak_mib=max(peaks[m]) / MIB if peaks[m] else None,
            saved_mib=saved_bytes[m] / MIB,
            loss=statistics.median(s.loss for s in steps[m]),
            step_times=times[m],
            losses=[s.loss for s in steps[m]],
        )
        for m in METHODS
    }
    sparse_steps = steps["sparselora"]
    speedup = timing["lora"].median_s / timing["sparselora"].median_s
    # The two steps of a pair ran back to back: their ratio is robust to slow drifts.
    pairs = zip(times["lora"], times["sparselora"], strict=True)
    predicted = flops["lora"] / flops["sparselora"]
    estimator_s = statistics.median(s.estimator_seconds for s in sparse_steps)

    def kept(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.mean(known) if known else None

    return BenchRow(
        shape=shape.name,
        seq_len=shape.seq_len,
        out_tokens=shape.out_tokens,
        padding=padding,
        batch_size=batch_size,
        real_tokens=real_tokens,
        pad_fraction=1.0 - real_tokens / (batch_size * shape.seq_len),
        lora=methods["lora"],
        sparselora=methods["sparselora"],
        speedup=speedup,
        paired_speedup=statistics.median(a / b for a, b in pairs),
        predicted_speedup=predicted,
        fraction_of_predicted=speedup / predicted,
        end_to_end_speedup=1.0 / (dense_fraction + (1.0 - dense_fraction) / speedup),
        dense_step_fraction=dense_fraction,
        estimator_s=estimator_s,
        estimator_share=estimator_s / timing["sparselora"].median_s,
        ffn_kept=kept([s.ffn_kept for s in sparse_steps]),
        attn_kept=kept([s.attn_kept for s in sparse_steps]),
        model=model,
        preset=preset,
    )


# -- measurement ---------------------------------------------------------------------------


class StepRunner:
    """Runs end-to-end training steps of either method from the same adapter state."""

    def __init__(
        self, model: nn.Module, handle: SparseLoRA, learning_rate: float, device: torch.device
    ) -> None:
        self.model, self.handle, self.device = model, handle, device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.snapshot = [p.detach().clone() for p in self.trainable]
        self.optimizers = {
            method: torch.optim.AdamW(self.trainable, lr=learning_rate) for method in METHODS
        }

    def _restore(self) -> None:
        with torch.no_grad():
            for param, saved in zip(self.trainable, self.snapshot, strict=True):
                param.copy_(saved)

    def _mode(self, method: str):
        return self.handle.dense() if method == "lora" else contextlib.nullcontext()

    def step(self, method: str, batch: Mapping[str, torch.Tensor]) -> Step:
        """One timed step of `method` on `batch` from the snapshotted adapters."""
        self._restore()
        optimizer = self.optimizers[method]
        self.handle.stats.window()  # start this step's statistics window
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

        def run() -> torch.Tensor:
            with self._mode(method):
                loss = self.model(**batch, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return loss

        loss, seconds = timed(run, self.device)
        window = self.handle.stats.window()
        return Step(
            seconds=seconds,
            loss=loss.item(),
            estimator_seconds=window.get("estimator_seconds", 0.0),
            ffn_kept=window.get("ffn_kept"),
            attn_kept=window.get("attn_kept"),
            peak_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
        )

    def saved_bytes(self, method: str, batch: Mapping[str, torch.Tensor]) -> int:
        """Bytes autograd keeps for backward after one forward of `method` (untimed)."""
        self._restore()
        with self._mode(method), saved_activation_bytes(self.model) as seen:
            loss = self.model(**batch, use_cache=False).loss
        total = sum(seen.values())
        del loss
        return total


def predicted_flops(
    shape: ModelShape,
    bench_shape: BenchShape,
    batch: Mapping[str, torch.Tensor],
    config: SparseLoRAConfig | None,
    lora_rank: int,
    lora_targets: Sequence[str],
) -> float:
    """`step_flops` total of this batch; padding as the mean pad tokens per row."""
    rows = batch["input_ids"].shape[0]
    pad = round((batch["attention_mask"] == 0).sum().item() / rows)
    return step_flops(
        shape,
        bench_shape.seq_len,
        bench_shape.out_tokens,
        rows,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        config=config,
        pad_tokens=min(pad, bench_shape.seq_len - bench_shape.out_tokens),
    )["total"]


def measure_row(
    runner: StepRunner,
    config: BenchConfig,
    sparse_config: SparseLoRAConfig,
    model_shape: ModelShape,
    bench_shape: BenchShape,
    padding: str,
    progress: bool = False,
) -> BenchRow:
    """Warm-up and timed pairs of steps of both methods on one synthetic batch."""
    batch = synthetic_batch(
        model_shape.vocab_size, config.batch_size, bench_shape, padding, config.seed, runner.device
    )
    steps: dict[str, list[Step]] = {method: [] for method in METHODS}
    label = f"{bench_shape.name} pad={padding}"
    schedule = pair_schedule(config.warmup_steps, config.steps)
    for is_timed, order in tqdm(schedule, desc=label, disable=not progress, leave=False):
        for method in order:
            step = runner.step(method, batch)
            if is_timed:
                steps[method].append(step)
    flops = {
        method: predicted_flops(
            model_shape,
            bench_shape,
            batch,
            sparse_config if method == "sparselora" else None,
            config.lora_rank,
            config.lora_targets,
        )
        for method in METHODS
    }
    row = bench_row(
        bench_shape,
        padding,
        config.batch_size,
        real_tokens=int(batch["attention_mask"].sum().item()),
        steps=steps,
        saved_bytes={method: runner.saved_bytes(method, batch) for method in METHODS},
        flops=flops,
        dense_fraction=sparse_config.start_step + (1.0 - sparse_config.end_step),
        model=config.model,
        preset=sparse_config.preset or config.sparselora,
    )
    logger.info(
        "%s: LoRA %.4f s, SparseLoRA %.4f s, speedup %.2fx (predicted %.2fx), estimator %.1f%%",
        label,
        row.lora.median_s,
        row.sparselora.median_s,
        row.speedup,
        row.predicted_speedup,
        100 * row.estimator_share,
    )
    return row


def run_benchmark(config: BenchConfig, progress: bool = False) -> BenchResults:
    """Measure every (shape, padding) row of `config`. Writes nothing (see `perf.report`).

    `progress` shows a tqdm bar per row (for the CLI); `config.threads` applies for the duration
    of the call.
    """
    with torch_threads(config.threads):
        device = resolve_device(config.device)
        sparse_config = config.sparse_config()
        shapes = [parse_shape(s) for s in config.shapes]
        model = config.base_model(device)
        dtype = next(model.parameters()).dtype
        model_shape = ModelShape.from_config(model.config)
        model, handle, setup_seconds = add_lora_and_sparselora(
            model, config, sparse_config, model_shape.vocab_size, shapes[0], device
        )
        runner = StepRunner(model, handle, config.learning_rate, device)
        try:
            rows = [
                measure_row(runner, config, sparse_config, model_shape, shape, padding, progress)
                for shape in shapes
                for padding in config.padding
            ]
        finally:
            handle.remove()
        header = hardware_header(device)
        header.update(
            dtype=str(dtype).removeprefix("torch."),
            model=config.model,
            random_weights=config.random_weights,
            load_in_4bit=config.load_in_4bit,
            model_shape=dataclasses.asdict(model_shape),
            preset=sparse_config.preset or config.sparselora,
            sparselora_config=sparse_config.to_dict(),
            estimator_setup_s=setup_seconds,
            bench_config=dataclasses.asdict(config),
        )
    return BenchResults(header, rows)
