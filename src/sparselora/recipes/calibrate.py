"""`sparselora calibrate`: a preset measured for one model, one dataset and one training shape.

1. **Sweep.** For every layer, the FFN at each level of `ffn_levels` and the attention at each
   level of `attn_levels` are made sparse alone, and the held-out loss change against the dense
   model is measured as paired per-example differences (`preset_choice.paired_change`). The
   estimator is the run's own (its kind, rank and criteria from the run config, calibrated on
   the first training examples as `train` does); context tokens are sparse and answer positions
   dense, as in training. No adapter: at step 0 a LoRA adapter is the identity.
2. **Cheap.** Layers before the probed one are dense, so their output is computed once per layer
   and reused: a probe at layer L runs layers L.. only (the earlier layers are stood in for by
   `_Skipped`, and layer L receives the stored hidden states). One-layer measurements are a
   screen on `sweep_examples` examples; a block's lower levels are measured only where its
   highest level is clearly over the budget. Combinations, which decide, are sampled in chunks
   until their interval lies wholly within or above the budget (`min_examples` to
   `max_examples`).
3. **Choice.** Predicted FLOPs of each option from the analytic counter at the run's shape;
   `preset_choice.search` chooses, measures the combination and repairs it until it fits.
4. **Output.** A SparseLoRAConfig YAML (`sparselora train ... sparselora.preset=PATH`), a
   markdown report and a PNG of predicted speedup against measured loss change.

Every measurement is cached on disk (`cache_dir`), per example, so an interrupted run resumes
and a second budget is answered from the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparselora.config import IGNORE_INDEX, ConfigError, SparseLoRAConfig, doc
from sparselora.engine.flops import DEFAULT_LORA_TARGETS, step_flops
from sparselora.engine.handle import apply_sparselora
from sparselora.engine.handle import logger as handle_logger
from sparselora.engine.models import family_for
from sparselora.engine.shapes import STAGE, ModelShape
from sparselora.recipes.calibrate_report import write_report
from sparselora.recipes.data import CALIBRATION_EXAMPLES, Collator, calibration_batches
from sparselora.recipes.loading import load_model, load_tokenizer
from sparselora.recipes.preset_choice import (
    Assignment,
    Change,
    Option,
    Search,
    paired_change,
    search,
    spec,
)
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.run_folder import RunFolderError
from sparselora.recipes.train import load_examples, train
from sparselora.version import __version__

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.5  # percent of held-out loss, when no speedup target is given
DEFAULT_CACHE = Path.home() / ".cache" / "sparselora" / "calibrate"


@dataclass
class CalibrateConfig:
    """Options of `sparselora calibrate` (the model, data and shape come from the run config)."""

    loss_budget: float | None = field(
        default=None,
        metadata=doc(
            f"Largest held-out loss change allowed, in percent, in either direction: for the "
            f"measured change of the chosen preset, and for the whole 95% interval of each "
            f"block it uses (default {DEFAULT_BUDGET} unless --target-speedup is given)."
        ),
    )
    target_speedup: float | None = field(
        default=None,
        metadata=doc(
            "Instead of a budget: reach this predicted training-step speedup over LoRA at the "
            "least summed one-layer loss change."
        ),
    )
    ffn_levels: list[float] = field(
        default_factory=lambda: [0.5, 0.75, 0.9],
        metadata=doc("FFN sparsities measured in every layer."),
    )
    attn_levels: list[float] = field(
        default_factory=lambda: [0.25, 0.5],
        metadata=doc(
            "Attention sparsities measured in every layer with attention (an empty list, "
            "`--attn-levels ''`, for none)."
        ),
    )
    full_grid: bool = field(
        default=False,
        metadata=doc(
            "Measure every level of every block. By default a block's lower levels are measured "
            "only where its highest level's interval lies wholly outside +-budget."
        ),
    )
    sweep_examples: int = field(
        default=16,
        metadata=doc("Held-out examples behind each one-layer measurement (a screen)."),
    )
    min_examples: int = field(
        default=16, metadata=doc("Held-out examples a combination is measured on at least.")
    )
    max_examples: int = field(
        default=64,
        metadata=doc("Held-out examples a combination is measured on at most (the pool)."),
    )
    chunk: int = field(default=8, metadata=doc("Examples per sampling step."))
    max_rounds: int = field(
        default=12, metadata=doc("Combinations measured at most while repairing.")
    )
    seq_len: int | None = field(
        default=None,
        metadata=doc("Tokens per sequence for the FLOPs prediction (default: the data's mean)."),
    )
    answer_len: int | None = field(
        default=None,
        metadata=doc("Labelled tokens per sequence for it (default: the data's mean)."),
    )
    seed: int = field(default=0, metadata=doc("Seed of the held-out sample."))
    out: str = field(default="preset.yaml", metadata=doc("The preset file written."))
    report: str | None = field(
        default=None,
        metadata=doc("Folder of the report and plot (default: OUT without suffix + '-report')."),
    )
    cache_dir: str = field(
        default=str(DEFAULT_CACHE), metadata=doc("Where measurements are cached.")
    )
    validate_steps: int = field(
        default=0,
        metadata=doc(
            "If > 0: fine-tune LoRA and the chosen preset for this many steps each and report "
            "the held-out loss gap (docs/QUALITY.md protocol, one after the other)."
        ),
    )

    def __post_init__(self) -> None:
        if self.loss_budget is not None and self.target_speedup is not None:
            raise ConfigError("give loss_budget or target_speedup, not both")
        if self.loss_budget is not None and not self.loss_budget > 0:
            raise ConfigError(f"loss_budget must be > 0 (percent), got {self.loss_budget}")
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ConfigError(f"target_speedup must be > 1, got {self.target_speedup}")
        for name in ("ffn_levels", "attn_levels"):
            bad = [v for v in getattr(self, name) if not 0 < v < 1]
            if bad:
                raise ConfigError(f"{name}: every level must be in (0, 1), got {bad}")
        if not self.ffn_levels and not self.attn_levels:
            raise ConfigError("ffn_levels and attn_levels are both empty: nothing to measure")
        for name, minimum in (("min_examples", 2), ("chunk", 1), ("max_rounds", 1)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.max_examples < self.min_examples:
            raise ConfigError(
                f"max_examples ({self.max_examples}) must be >= min_examples ({self.min_examples})"
            )
        if not 2 <= self.sweep_examples <= self.max_examples:
            raise ConfigError(
                f"sweep_examples must be between 2 and max_examples ({self.max_examples}), "
                f"got {self.sweep_examples}"
            )
        if self.validate_steps < 0:
            raise ConfigError(f"validate_steps must be >= 0, got {self.validate_steps}")

    @property
    def budget(self) -> float | None:
        if self.target_speedup is not None:
            return None
        return DEFAULT_BUDGET if self.loss_budget is None else self.loss_budget

    @property
    def report_dir(self) -> Path:
        if self.report is not None:
            return Path(self.report)
        out = Path(self.out)
        return out.with_name(out.stem + "-report")


# -- resuming a forward at layer L ------------------------------------------------------------


class _Skipped(nn.Module):
    """Stands in for a decoder layer whose output is already known: passes its input on."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        return (hidden_states,) if self.as_tuple else hidden_states


class _Captured(Exception):
    """Raised by a capture hook to end a forward once the wanted hidden states are seen."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def resumed_at(
    layers: nn.ModuleList, index: int, hidden: torch.Tensor | None, as_tuple: bool
) -> Iterator[None]:
    """Within the block, a forward skips layers 0..index-1 and feeds `hidden` (B, T, H), their
    known output, to layer `index`. index 0 (or hidden None) changes nothing."""
    if index == 0 or hidden is None:
        yield
        return
    originals = [layers[i] for i in range(index)]

    def inject(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    hook = layers[index].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        for i in range(index):
            layers[i] = _Skipped(as_tuple)
        yield
    finally:
        hook.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


def example_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each example: (B,).

    logits: (B, T, V) full logits, or (N, V) for the N labelled positions in row-major order of
    (batch, position) (the labelled-logits saving's output); labels (B, T), unshifted.
    """
    targets = labels[:, 1:]  # (B, T-1)
    read = targets != IGNORE_INDEX
    if logits.dim() == 3:
        logits = logits[:, :-1][read]  # (N, V)
    losses = F.cross_entropy(logits.float(), targets[read], reduction="none")  # (N,)
    rows = read.nonzero()[:, 0].to(losses.device)  # the example of each labelled position
    return torch.zeros(labels.shape[0], device=losses.device).index_add_(0, rows, losses)


# -- measurements -------------------------------------------------------------------------------


class _Cache:
    """Per-example summed losses of every measurement, in one JSON file per setting."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, list[float]] = {}
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text())["sums"]
            except (ValueError, KeyError, TypeError) as err:
                logger.warning("ignoring unreadable calibration cache %s (%s)", path, err)

    def get(self, key: str) -> list[float]:
        return list(self.data.get(key, []))

    def put(self, key: str, sums: list[float]) -> None:
        self.data[key] = list(sums)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"sums": self.data}))
        os.replace(tmp, self.path)


def _key(assignment_spec: Mapping[str, Any]) -> str:
    return json.dumps(assignment_spec, sort_keys=True)


class Prober:
    """Measures the held-out loss change of a sparsity assignment on a fixed example pool.

    chunks: the pool in sampling order, each chunk a list of collated micro-batches (examples of
    similar length, so little padding). base: the run's SparseLoRAConfig with no sparsity (its
    estimator settings and exact savings are what every probe uses).
    """

    def __init__(
        self,
        model: nn.Module,
        base: SparseLoRAConfig,
        estimator,
        chunks: Sequence[Sequence[Mapping[str, torch.Tensor]]],
        cache: _Cache,
        options: CalibrateConfig,
    ) -> None:
        self.model = model
        self.base = base
        self.estimator = estimator
        self.batches = [batch for chunk in chunks for batch in chunk]
        self.chunk_batches: list[list[int]] = []
        for chunk in chunks:
            first = sum(len(c) for c in self.chunk_batches)
            self.chunk_batches.append(list(range(first, first + len(chunk))))
        self.sizes = [sum(_count(b) for b in chunk) for chunk in chunks]
        self.cache = cache
        self.options = options
        self.layers = family_for(model.config.model_type).decoder_layers(model)
        self.num_layers = len(self.layers)
        self.layer_passes = 0  # example-layers computed, for the cost report
        self.as_tuple = self._layer_returns_tuple()
        self._at: int = 0  # the layer whose dense input `_hidden` holds, per micro-batch
        self._hidden: list[torch.Tensor | None] = [None] * len(self.batches)
        self.dense = self._dense_sums()
        self.reuse = self._reuse_is_exact()

    # -- forwards --

    def _layer_returns_tuple(self) -> bool:
        seen: list[bool] = []

        def record(module, args, output):
            seen.append(isinstance(output, tuple))
            raise _Captured(output[0] if isinstance(output, tuple) else output)

        hook = self.layers[0].register_forward_hook(record)
        try:
            with torch.no_grad(), contextlib.suppress(_Captured):
                self.model(**_inputs(self.batches[0]))
        finally:
            hook.remove()
        return seen[0]

    def _capture(self, batch: int, index: int) -> torch.Tensor:
        """The dense input of layer `index` for micro-batch `batch`, resuming from the stored
        hidden states when they belong to an earlier layer."""

        def grab(module, args, kwargs):
            raise _Captured(_hidden_arg(args, kwargs))

        start = self._at if self._hidden[batch] is not None and self._at <= index else 0
        hidden = self._hidden[batch] if start else None
        hook = self.layers[index].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with resumed_at(self.layers, start, hidden, self.as_tuple), torch.no_grad():
                self.model(**_inputs(self.batches[batch]))
        except _Captured as captured:
            self.layer_passes += (index - start) * _count(self.batches[batch])
            return captured.hidden
        finally:
            hook.remove()
        raise RuntimeError(f"layer {index} was not reached")

    def _advance(self, index: int) -> None:
        """Make `_hidden` the dense input of layer `index` for every micro-batch."""
        if index == self._at and all(h is not None for h in self._hidden):
            return
        if index < self._at:
            self._at, self._hidden = 0, [None] * len(self.batches)
        hidden = [self._capture(b, index) if index else None for b in range(len(self.batches))]
        self._at, self._hidden = index, hidden

    def _sums(self, config: SparseLoRAConfig, chunk: int, start: int) -> list[float]:
        """Per-example summed loss of `chunk` under `config`, resuming at layer `start`."""
        with _quiet(handle_logger):  # one line per probe and chunk would drown the progress bar
            handle = apply_sparselora(self.model, config, estimator=self.estimator, use_cache=False)
        sums: list[float] = []
        try:
            for index in self.chunk_batches[chunk]:
                batch = self.batches[index]
                hidden = self._hidden[index] if start else None
                with resumed_at(self.layers, start, hidden, self.as_tuple), torch.no_grad():
                    out = self.model(**batch)
                sums += example_sums(out.logits, batch["labels"]).tolist()
        finally:
            handle.remove()
        self.layer_passes += (self.num_layers - start) * self.sizes[chunk]
        return sums

    def _config(self, assignment_spec: Mapping[str, Any]) -> SparseLoRAConfig:
        return dataclasses.replace(self.base, **assignment_spec)

    def _dense_sums(self) -> list[float]:
        key = _key({})
        sums = self.cache.get(key)
        if len(sums) < sum(self.sizes):
            sums = []
            for chunk in range(len(self.sizes)):
                sums += self._sums(self._config({}), chunk, 0)
            self.cache.put(key, sums)
        return sums

    def _reuse_is_exact(self) -> bool:
        """Whether forwards resumed at the last layer reproduce the dense losses of the first
        chunk (a family whose layers share state beyond the hidden states, such as Gemma 4's
        shared keys and values, would not); if not, every probe runs all layers."""
        last = self.num_layers - 1
        if last == 0:
            return False
        first = self.chunk_batches[0]
        self._hidden = [
            self._capture(b, last) if b in first else None for b in range(len(self.batches))
        ]
        self._at = last
        resumed = self._sums(self._config({}), 0, last)
        self._at, self._hidden = 0, [None] * len(self.batches)
        dense = self.dense[: self.sizes[0]]
        exact = all(
            abs(r - d) <= 1e-4 * max(1.0, abs(d)) for r, d in zip(resumed, dense, strict=True)
        )
        if not exact:
            logger.warning(
                "resuming a forward at a later layer does not reproduce this model's dense loss "
                "(%s vs %s); every measurement runs the whole model",
                resumed[:2],
                dense[:2],
            )
        return exact

    # -- the public measurement --

    def measure(
        self, assignment_spec: Mapping[str, Any], budget: float | None, examples: int | None = None
    ) -> Change:
        """The paired loss change of `assignment_spec` ({'ffn_sparsity': {...}, ...}).

        With `examples`, on (the whole chunks covering) that many examples: a one-layer screen.
        Otherwise chunks are added from `min_examples` until the interval lies wholly within or
        wholly above `budget` (with no budget, the whole pool), at most `max_examples`.
        """
        layers = self._config(assignment_spec).layer_sparsity(self.num_layers)
        touched = set(layers[0]) | set(layers[1])
        total = sum(self.sizes)
        if not touched:
            return Change(0.0, 0.0, total)
        key = _key(assignment_spec)
        sums = self.cache.get(key)
        start = min(touched) if self.reuse else 0
        config = self._config(assignment_spec)
        while True:
            n = len(sums)
            if n >= 2:
                change = paired_change(sums, self.dense[:n])
                if n >= total or _settled(change, n, budget, examples, self.options.min_examples):
                    return change
            if start:
                self._advance(start)
            sums += self._sums(config, _chunk_at(self.sizes, n), start)
            self.cache.put(key, sums)


@contextlib.contextmanager
def _quiet(target: logging.Logger) -> Iterator[None]:
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


def _settled(
    change: Change, n: int, budget: float | None, examples: int | None, minimum: int
) -> bool:
    if examples is not None:
        return n >= examples
    if n < minimum or budget is None:
        return False
    return change.lower > budget or change.upper < -budget  # clearly outside +-budget


def _chunk_at(sizes: Sequence[int], examples: int) -> int:
    """The chunk that starts at example `examples` of the pool."""
    start = 0
    for i, size in enumerate(sizes):
        if start == examples:
            return i
        start += size
    raise ValueError(f"no chunk starts at example {examples}")


def _count(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def micro_batches(examples: Sequence[dict], collator: Collator, waste: float = 1.1) -> list[dict]:
    """Collated batches of `examples` sorted by length, each padded at most `waste` times its
    real tokens (random examples of GSM8K padded together waste about 40%)."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    groups: list[list[dict]] = []
    for example in ordered:
        group = groups[-1] if groups else None
        length = len(example["input_ids"])  # the longest so far: examples come sorted
        if group and length * (len(group) + 1) <= waste * (
            sum(len(e["input_ids"]) for e in group) + length
        ):
            group.append(example)
        else:
            groups.append([example])
    return [collator(group) for group in groups]


def _inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


# -- the command ----------------------------------------------------------------------------


@dataclass
class Calibration:
    """What `calibrate` found; also written to the report."""

    config: SparseLoRAConfig
    search: Search
    options: list[Option]
    skipped: list[tuple[str, int, float, str]]
    dense_loss: float
    examples_pool: int
    shape: dict[str, int]
    lora_flops: float
    base_flops: float
    seconds: float
    full_forwards: float
    reuse: bool
    paths: dict[str, str]
    speedup: float  # predicted step speedup of the chosen preset over LoRA
    validation: dict[str, Any] | None = None


def _pool(examples: Sequence[dict], options: CalibrateConfig) -> list[dict]:
    """A seeded sample of training examples not used to fit the estimator."""
    candidates = list(examples[CALIBRATION_EXAMPLES:])
    random.Random(options.seed).shuffle(candidates)
    pool = candidates[: options.max_examples]
    if len(pool) < options.min_examples:
        raise ConfigError(
            f"calibrate needs at least {options.min_examples} training examples beyond the "
            f"{CALIBRATION_EXAMPLES} that fit the estimator; the data has {len(examples)}"
        )
    return pool


def _setting_key(run: RunConfig, base: SparseLoRAConfig, fingerprint: str, pool, chunk: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(
        {"model": run.model.name, "dtype": run.model.dtype, "estimator": fingerprint,
         "base": dataclasses.asdict(base), "chunk": chunk, "version": __version__},
        sort_keys=True, default=str,
    ).encode())  # fmt: skip
    for example in pool:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()[:20]


def calibrate(run: RunConfig, options: CalibrateConfig, progress: bool = False) -> Calibration:
    """Measure, choose and write a preset for the model, data and shape of `run`.

    Writes options.out (a SparseLoRAConfig YAML) and options.report_dir (report.md,
    frontier.png, sweep.csv). Raises ConfigError for unusable settings.
    """
    if options.validate_steps and not run.data.eval:
        raise ConfigError("validate_steps needs held-out data: set data.eval in the run config")
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    model = load_model(run.model.name, run.model.dtype, run.model.attn_implementation).eval()
    tokenizer = load_tokenizer(run.model.name)
    collator = Collator(tokenizer.pad_token_id, run.data.padding_side)
    examples = load_examples(run.data.train, tokenizer, run, run.data.max_train_examples)
    pool = _pool(examples, options)
    device = next(model.parameters()).device
    chunks = [
        [
            {k: v.to(device) for k, v in batch.items()}
            for batch in micro_batches(pool[i : i + options.chunk], collator)
        ]
        for i in range(0, len(pool), options.chunk)
    ]

    family = family_for(model.config.model_type)
    layers = family.decoder_layers(model)
    with_attention = [
        i for i, layer in enumerate(layers) if family.block(layer, i, model.config).has_attention
    ]
    run_config = run.sparse_config()
    base = dataclasses.replace(
        run_config, ffn_sparsity={}, attn_sparsity={}, sparse_in_eval=True, start_step=0.0,
        end_step=1.0, preset=None,
    )  # fmt: skip
    every = dataclasses.replace(
        base,
        ffn_sparsity={f"0-{len(layers) - 1}": max(options.ffn_levels)}
        if options.ffn_levels
        else {},
        attn_sparsity=(
            {str(i): max(options.attn_levels) for i in with_attention}
            if options.attn_levels
            else {}
        ),
    )
    calibration = (
        calibration_batches(examples, collator) if base.estimator == "whitened_svd" else None
    )
    handle = apply_sparselora(model, every, calibration=calibration, use_cache=False)
    estimator = handle.estimator
    handle.remove()

    cache = _Cache(
        Path(options.cache_dir)
        / f"{_setting_key(run, base, estimator.fingerprint, pool, options.chunk)}.json"
    )
    prober = Prober(model, base, estimator, chunks, cache, options)
    dense_loss = sum(prober.dense) / sum(
        int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in prober.batches
    )

    shape = _flops_shape(examples, run, options)
    model_shape = ModelShape.from_config(model.config)
    targets = [t for t in run.lora.target_modules if t in STAGE] or list(DEFAULT_LORA_TARGETS)

    def flops(assignment_spec: Mapping[str, Any] | None) -> float:
        config = (
            None if assignment_spec is None else dataclasses.replace(run_config, **assignment_spec)
        )
        return step_flops(
            model_shape, shape["seq_len"], shape["answer_len"], batch=shape["batch"],
            lora_rank=run.lora.r, lora_targets=targets, config=config,
        )["total"]  # fmt: skip

    lora_flops = flops(None)
    base_flops = flops({"ffn_sparsity": {}, "attn_sparsity": {}})

    budget = options.budget
    groups = [("ffn", i, options.ffn_levels) for i in range(len(layers)) if options.ffn_levels]
    groups += [("attn", i, options.attn_levels) for i in with_attention if options.attn_levels]
    groups.sort(key=lambda g: (g[1], g[0]))  # layer order: the dense prefix streams

    def one_layer(block: str, layer: int, sparsity: float) -> Option:
        probe_spec: dict[str, dict[str, float]] = {"ffn_sparsity": {}, "attn_sparsity": {}}
        probe_spec[f"{block}_sparsity"] = {str(layer): sparsity}
        change = prober.measure(probe_spec, budget, options.sweep_examples)
        return Option(block, layer, sparsity, change, base_flops - flops(probe_spec))

    option_list, skipped = _sweep(groups, one_layer, options, progress)

    def measure(assignment: Assignment) -> Change:
        return prober.measure(spec(assignment), budget)

    def speedup_of(assignment: Assignment) -> float:
        return lora_flops / flops(spec(assignment))

    needed = None
    if options.target_speedup is not None:
        needed = base_flops - lora_flops / options.target_speedup
    result = search(
        option_list, measure, speedup_of, budget=budget, target_speedup=options.target_speedup,
        needed_saving=needed, max_rounds=options.max_rounds,
    )  # fmt: skip
    chosen = dataclasses.replace(run_config, preset=None, **spec(result.chosen))

    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen.save(out)
    calibration_result = Calibration(
        config=chosen, search=result, options=option_list, skipped=skipped,
        dense_loss=dense_loss, examples_pool=len(pool), shape=shape, lora_flops=lora_flops,
        base_flops=base_flops, seconds=time.perf_counter() - started,
        full_forwards=prober.layer_passes / len(layers), reuse=prober.reuse,
        paths={"preset": str(out)}, speedup=speedup_of(result.chosen),
    )  # fmt: skip
    prober = model = None  # free the model before validation loads its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if options.validate_steps:
        calibration_result.validation = validate(run, out, options)
    write_report(calibration_result, run, options)
    return calibration_result


def _sweep(groups, one_layer, options: CalibrateConfig, progress: bool):
    """Every (block, layer) at its levels, the highest first. Its lower levels are measured
    (from the lowest up, stopping once one is clearly over the budget) only where the highest
    is clearly over the budget: elsewhere the highest level is the candidate, and the repair
    step drops it if the combination needs that. `full_grid` (and a speedup target, which has
    no budget to judge by) measures every level.
    Returns (options measured, [(block, layer, sparsity, why not measured)])."""
    budget = options.budget
    measured: list[Option] = []
    skipped: list[tuple[str, int, float, str]] = []
    bar = tqdm(total=sum(len(g[2]) for g in groups), desc="sensitivity", unit="probe",
               disable=not progress)  # fmt: skip
    for block, layer, levels in groups:
        top, *rest = sorted(levels, reverse=True)
        option = one_layer(block, layer, top)
        measured.append(option)
        bar.update(1)
        why = None
        if budget is not None and not options.full_grid and not _clearly_over(option, budget):
            why = f"the {top:g} level is not clearly over the budget"
        for sparsity in sorted(rest):
            if why is None:
                option = one_layer(block, layer, sparsity)
                measured.append(option)
                if budget is not None and _clearly_over(option, budget):
                    why = f"the {sparsity:g} level is clearly over the budget"
            else:
                skipped.append((block, layer, sparsity, why))
            bar.update(1)
        bar.set_postfix_str(f"{block} {layer}: {option.change.percent:+.2f}%")
    bar.close()
    return measured, skipped


def _clearly_over(option: Option, budget: float) -> bool:
    """Whether the whole one-layer interval lies outside +-budget."""
    return option.change.lower > budget or option.change.upper < -budget


def _flops_shape(examples: Sequence[dict], run: RunConfig, options: CalibrateConfig) -> dict:
    """The shape the preset is chosen for: the data's mean lengths unless given."""
    tokens = [len(e["input_ids"]) for e in examples]
    labelled = [sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples]
    seq_len = options.seq_len or round(sum(tokens) / len(tokens))
    answer_len = options.answer_len or round(sum(labelled) / len(labelled))
    if not 1 <= answer_len <= seq_len:
        raise ConfigError(f"answer_len ({answer_len}) must be between 1 and seq_len ({seq_len})")
    return {"seq_len": seq_len, "answer_len": answer_len, "batch": run.training.batch_size}


def validate(run: RunConfig, preset: Path, options: CalibrateConfig) -> dict[str, Any]:
    """Fine-tune LoRA and SparseLoRA with `preset` for `options.validate_steps` steps each
    (same seed, data and schedule) and compare their held-out losses at the same steps."""
    steps = options.validate_steps
    losses: dict[str, dict[int, float]] = {}
    summaries = {}
    for method in ("lora", "sparselora"):
        config = RunConfig.from_dict(run.to_dict())
        config.training.method = method
        config.training.output_dir = str(options.report_dir / f"validate-{method}")
        config.training.max_steps = steps
        config.training.eval_steps = max(1, steps // 6)
        config.training.save_steps = 0
        config.training.resume = False
        config.logging.tensorboard = False
        config.sparselora = {"preset": str(preset)}
        try:  # the same validation done before is reported finished, not trained again
            summaries[method] = train(config)
        except RunFolderError as err:  # another preset's validation: moved aside, kept
            logger.info("%s", err)
            summaries[method] = train(config, overwrite=True)
        state = json.loads((Path(config.training.output_dir) / "trainer_state.json").read_text())
        losses[method] = {
            int(e["step"]): float(e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e
        }
    steps_seen = sorted(set(losses["lora"]) & set(losses["sparselora"]))
    return {
        "steps": steps,
        "gap_pct": {
            s: 100 * (losses["sparselora"][s] - losses["lora"][s]) / losses["lora"][s]
            for s in steps_seen
        },
        "lora": losses["lora"],
        "sparselora": losses["sparselora"],
        "step_seconds": {m: summaries[m].get("median_step_seconds") for m in summaries},
    }
