"""`sparselora bench`: measured training-step speed of SparseLoRA against PEFT LoRA.

The protocol of METHOD.md section 6. One PEFT LoRA model and one SparseLoRA handle: LoRA
steps run under `handle.dense()` (the wrapped forwards call the original modules, so the step is
PEFT LoRA's own), SparseLoRA steps run sparse from step 0 (the estimator is fitted before the
first step). For each shape (L, out) and padding mode, both methods train end to end (forward,
backward, AdamW step, zero_grad) on the SAME synthetic batch: random token ids, labels -100
except the last `out` tokens of each row. Steps run in pairs, A B B A A B ..., so slow drifts of
a shared machine hit both alike and neither method always goes first; warm-up steps are run the
same way, untimed.

Same state for both methods: the trainable (LoRA) parameters are snapshotted once and restored
before every step (outside the timed region), and each method has its own AdamW. Every step of
a method therefore repeats the same computation from the same weights; only the optimizer's
moments advance, which does not change its cost.

Reported per (shape, padding) row: median, min and max step seconds per method; measured speedup
(median LoRA / median SparseLoRA) and the paired speedup (median over pairs of the two adjacent
steps' ratio, robust to drift); the FLOPs-predicted speedup (`sparselora.engine.flops.step_flops`
on the same shape, padding and config) and measured / predicted; the estimator's share of the
sparse step (host-side seconds of channel selection, `handle.stats`); the end-to-end speedup of
a training run whose schedule runs the `start_step` fraction (and the steps after `end_step`)
dense; real tokens per second; memory: on CUDA the peak allocated bytes of a step
(`torch.cuda.max_memory_allocated`, reset per step), and on every device the bytes autograd
saves for backward in one forward (a probe step, untimed). CPU peak memory is not reported:
PyTorch's CPU allocator has no peak counter and process RSS does not drop when the allocator
keeps freed blocks, so it cannot be attributed to one method in a shared process.

    sparselora bench --shapes math commonsense --padding none left --steps 10
    python -m sparselora.perf.bench --model DIR --config sparse.yaml --shapes 256,64
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sparselora import __version__
from sparselora.cli.app import configure_logging
from sparselora.config import IGNORE_INDEX, ConfigError, SparseLoRAConfig, get_preset
from sparselora.engine.flops import STAGE, TASK_SHAPES, ModelShape, load_shape, step_flops
from sparselora.engine.handle import SparseLoRA, apply_sparselora

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
DEFAULT_PRESET = "smollm2-135m-gsm8k"
PADDING_MODES = ("none", "left")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
METHODS = ("lora", "sparselora")
PAD_TOKEN_ID = 0
MIB = 2**20


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class BenchShape:
    """A benchmark batch shape: `seq_len` tokens per row, the last `out_tokens` labelled."""

    name: str
    seq_len: int
    out_tokens: int


def parse_shape(text: str) -> BenchShape:
    """A named shape (math, commonsense, code, chat) or a custom "L,out" such as "256,64"."""
    if text in TASK_SHAPES:
        return BenchShape(text, *TASK_SHAPES[text])
    parts = text.split(",")
    try:
        seq_len, out_tokens = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"shape {text!r} is not understood; use one of {list(TASK_SHAPES)} or 'L,out' "
            "(tokens per row, labelled tokens per row), e.g. '256,64'"
        ) from None
    if not 1 <= out_tokens < seq_len:
        raise ConfigError(
            f"shape {text!r}: need 1 <= out < L (a labelled token needs a position before it)"
        )
    return BenchShape(f"{seq_len},{out_tokens}", seq_len, out_tokens)


@dataclass
class BenchConfig:
    """What `sparselora bench` measures; validated on construction."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata=_help(
            "'smollm2-135m-instruct' (embedded), a Hugging Face id or a local directory; with "
            "random_weights also a paper model alias of `sparselora.engine.flops` (e.g. llama3-8b)."
        ),
    )
    random_weights: bool = field(
        default=False,
        metadata=_help("Build the model from its config with random weights (no checkpoint)."),
    )
    sparselora: str = field(
        default=DEFAULT_PRESET,
        metadata=_help("A preset name, or a SparseLoRA config file (.yaml/.yml/.json)."),
    )
    estimator: str | None = field(
        default=None,
        metadata=_help("Override the config's estimator kind ('svd' or 'whitened_svd')."),
    )
    shapes: list[str] = field(
        default_factory=lambda: ["math"],
        metadata=_help(f"Batch shapes: names {list(TASK_SHAPES)} or custom 'L,out'."),
    )
    padding: list[str] = field(
        default_factory=lambda: list(PADDING_MODES),
        metadata=_help(
            "'none': every row is L real tokens; 'left': each row has a random real length "
            "in [out+1, L] and is left-padded to L (the reference pads every batch so)."
        ),
    )
    batch_size: int = field(default=1, metadata=_help("Rows per step."))
    warmup_steps: int = field(default=2, metadata=_help("Untimed steps per method and row."))
    steps: int = field(default=5, metadata=_help("Timed steps per method and row."))
    lora_rank: int = field(default=32, metadata=_help("LoRA rank r."))
    lora_alpha: int = field(default=64, metadata=_help("LoRA alpha."))
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=_help("Projections with LoRA adapters."),
    )
    learning_rate: float = field(default=1e-4, metadata=_help("AdamW learning rate."))
    dtype: str = field(
        default="auto", metadata=_help("auto (float32 on CPU, bfloat16 on CUDA) or a dtype.")
    )
    device: str = field(default="auto", metadata=_help("auto (CUDA if available), cpu, cuda."))
    attn_implementation: str = field(default="sdpa", metadata=_help("'sdpa' or 'eager'."))
    threads: int | None = field(
        default=None, metadata=_help("torch CPU threads (default: torch's choice).")
    )
    calibration_batches: int = field(
        default=2,
        metadata=_help("whitened_svd: synthetic batches fitted before the first step."),
    )
    seed: int = field(default=0, metadata=_help("Seed of the synthetic batches and LoRA init."))
    output_dir: str = field(
        default="runs/bench", metadata=_help("Folder for bench.json, bench.csv, bench.png.")
    )

    def __post_init__(self) -> None:
        self.shapes = list(self.shapes)
        self.padding = list(self.padding)
        self.lora_targets = list(self.lora_targets)
        if not self.shapes:
            raise ConfigError(f"shapes is empty; choose from {list(TASK_SHAPES)} or 'L,out'")
        for shape in self.shapes:
            parse_shape(shape)
        _check_choices("padding", self.padding, PADDING_MODES)
        _check_choices("lora_targets", self.lora_targets, tuple(STAGE))
        _check_choices("dtype", [self.dtype], DTYPES)
        _check_choices("device", [self.device], DEVICES)
        if self.estimator is not None:
            _check_choices("estimator", [self.estimator], ("svd", "whitened_svd"))
        for name, minimum in (
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("steps", 1),
            ("lora_rank", 1),
            ("lora_alpha", 1),
            ("calibration_batches", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an integer >= 1, got {self.threads!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    def sparse_config(self) -> SparseLoRAConfig:
        """The SparseLoRA config named by `sparselora` (file or preset), with overrides."""
        path = Path(self.sparselora)
        if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
            config = SparseLoRAConfig.load(path)
        else:
            config = get_preset(self.sparselora)
        if self.estimator is not None:
            config = dataclasses.replace(config, estimator=self.estimator)
        return config

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but torch sees no CUDA device")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


def _check_choices(name: str, values: Sequence[str], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{name} = {bad or '[]'} is not allowed; choose from {list(allowed)}")


# -- model and data -----------------------------------------------------------------------


def llama_config(shape: ModelShape):
    """A `LlamaConfig` of `shape` with an untied LM head, for models built with random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=False,
    )


def load_bench_model(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base causal LM on `device` in `dtype`, in train mode; no tokenizer is needed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = config.model
    if config.random_weights:
        if name == EMBEDDED_MODEL:
            from sparselora.recipes.assets import smollm2_path

            model_config = AutoConfig.from_pretrained(smollm2_path())
        elif Path(name).is_dir():
            model_config = AutoConfig.from_pretrained(name)
        else:
            model_config = llama_config(load_shape(name))
        torch.manual_seed(config.seed)
        with device:  # initialise in place: an 8B model is not built on the CPU first
            model = AutoModelForCausalLM.from_config(
                model_config, dtype=dtype, attn_implementation=config.attn_implementation
            )
    elif name == EMBEDDED_MODEL:
        from sparselora.recipes.assets import load_smollm2

        model, _ = load_smollm2(dtype=dtype)
        model.config._attn_implementation = config.attn_implementation
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=config.attn_implementation
        )
    return model.to(device).train()


def synthetic_batch(
    vocab_size: int,
    batch_size: int,
    shape: BenchShape,
    padding: str,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Random token ids with the last `out_tokens` of each row labelled.

    Returns input_ids, attention_mask and labels, each (B, L) int64. padding 'none': every token
    is real. 'left': row b has a real length drawn uniformly from [out + 1, L] and is
    left-padded to L (pad id 0, mask 0, label -100), so about half of a long row is padding.
    """
    generator = torch.Generator().manual_seed(seed)
    size = (batch_size, shape.seq_len)
    input_ids = torch.randint(0, vocab_size, size, generator=generator)
    attention_mask = torch.ones(size, dtype=torch.long)
    if padding == "left":
        real = torch.randint(
            shape.out_tokens + 1, shape.seq_len + 1, (batch_size,), generator=generator
        )
        for row, length in enumerate(real.tolist()):
            input_ids[row, : shape.seq_len - length] = PAD_TOKEN_ID
            attention_mask[row, : shape.seq_len - length] = 0
    labels = torch.full(size, IGNORE_INDEX)
    labels[:, -shape.out_tokens :] = input_ids[:, -shape.out_tokens :]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


# -- measurement --------------------------------------------------------------------------


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def saved_activation_bytes(model: nn.Module) -> Iterator[dict[int, int]]:
    """Within the block, record each distinct storage autograd saves for backward.

    Yields {storage pointer: bytes}; parameters' own storages are excluded (they exist anyway),
    storages saved twice count once. Sum the values after the forward.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


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

    def step(self, method: str, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One timed step: {"seconds", "loss", "estimator_seconds", "peak_bytes" (CUDA)}."""
        self._restore()
        optimizer = self.optimizers[method]
        self.handle.stats.window()  # start this step's statistics window
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        sync_device(self.device)
        start = time.perf_counter()
        with self._mode(method):
            loss = self.model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync_device(self.device)
        seconds = time.perf_counter() - start
        window = self.handle.stats.window()
        result = {
            "seconds": seconds,
            "loss": loss.item(),
            "estimator_seconds": window.get("estimator_seconds", 0.0),
            "ffn_kept": window.get("ffn_kept"),
            "attn_kept": window.get("attn_kept"),
        }
        if cuda:
            result["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return result

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


def spread(times: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def measure_row(
    runner: StepRunner,
    config: BenchConfig,
    sparse_config: SparseLoRAConfig,
    model_shape: ModelShape,
    bench_shape: BenchShape,
    padding: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Warm-up and timed steps of both methods on one synthetic batch; one result row."""
    batch = synthetic_batch(
        model_shape.vocab_size,
        config.batch_size,
        bench_shape,
        padding,
        config.seed,
        runner.device,
    )
    steps = {method: [] for method in METHODS}

    # A B B A A B ...: each method goes first in every other pair, so an order effect (a step
    # running faster after the other method's step) cancels instead of favouring one method.
    def pair(i: int) -> tuple[str, ...]:
        return METHODS if i % 2 == 0 else METHODS[::-1]

    schedule = [(False, m) for i in range(config.warmup_steps) for m in pair(i)]
    schedule += [(True, m) for i in range(config.steps) for m in pair(i)]
    label = f"{bench_shape.name} pad={padding}"
    for timed, method in tqdm(schedule, desc=label, disable=not progress, leave=False):
        result = runner.step(method, batch)
        if timed:
            steps[method].append(result)
    saved = {method: runner.saved_bytes(method, batch) for method in METHODS}

    lora_times = [s["seconds"] for s in steps["lora"]]
    sparse_times = [s["seconds"] for s in steps["sparselora"]]
    lora, sparse = spread(lora_times), spread(sparse_times)
    speedup = lora["median"] / sparse["median"]
    # The two steps of a pair ran back to back: their ratio is robust to slow drifts.
    paired = statistics.median(a / b for a, b in zip(lora_times, sparse_times, strict=True))
    targets = [t for t in config.lora_targets if t in STAGE]
    flops = {
        method: predicted_flops(
            model_shape,
            bench_shape,
            batch,
            sparse_config if method == "sparselora" else None,
            config.lora_rank,
            targets,
        )
        for method in METHODS
    }
    predicted = flops["lora"] / flops["sparselora"]
    estimator_seconds = statistics.median(s["estimator_seconds"] for s in steps["sparselora"])
    dense_fraction = sparse_config.start_step + (1.0 - sparse_config.end_step)
    real_tokens = int(batch["attention_mask"].sum().item())

    def kept(name: str) -> float | None:
        values = [s[name] for s in steps["sparselora"] if s[name] is not None]
        return statistics.mean(values) if values else None

    def peak(method: str) -> float | None:
        values = [s["peak_bytes"] for s in steps[method] if "peak_bytes" in s]
        return max(values) / MIB if values else None

    row = {
        "shape": bench_shape.name,
        "seq_len": bench_shape.seq_len,
        "out_tokens": bench_shape.out_tokens,
        "padding": padding,
        "batch_size": config.batch_size,
        "real_tokens": real_tokens,
        "pad_fraction": 1.0 - real_tokens / batch["attention_mask"].numel(),
        "lora_median_s": lora["median"],
        "lora_min_s": lora["min"],
        "lora_max_s": lora["max"],
        "sparselora_median_s": sparse["median"],
        "sparselora_min_s": sparse["min"],
        "sparselora_max_s": sparse["max"],
        "speedup": speedup,
        "paired_speedup": paired,
        "predicted_speedup": predicted,
        "fraction_of_predicted": speedup / predicted,
        "end_to_end_speedup": 1.0 / (dense_fraction + (1.0 - dense_fraction) / speedup),
        "dense_step_fraction": dense_fraction,
        "lora_tflops": flops["lora"] / 1e12,
        "sparselora_tflops": flops["sparselora"] / 1e12,
        "estimator_s": estimator_seconds,
        "estimator_share": estimator_seconds / sparse["median"],
        "ffn_kept": kept("ffn_kept"),
        "attn_kept": kept("attn_kept"),
        "lora_tokens_per_s": real_tokens / lora["median"],
        "sparselora_tokens_per_s": real_tokens / sparse["median"],
        "lora_peak_mib": peak("lora"),
        "sparselora_peak_mib": peak("sparselora"),
        "lora_saved_mib": saved["lora"] / MIB,
        "sparselora_saved_mib": saved["sparselora"] / MIB,
        "lora_loss": statistics.median(s["loss"] for s in steps["lora"]),
        "sparselora_loss": statistics.median(s["loss"] for s in steps["sparselora"]),
        "lora_step_times": lora_times,
        "sparselora_step_times": sparse_times,
        "lora_losses": [s["loss"] for s in steps["lora"]],
        "sparselora_losses": [s["loss"] for s in steps["sparselora"]],
    }
    logger.info(
        "%s: LoRA %.4f s, SparseLoRA %.4f s, speedup %.2fx (predicted %.2fx), estimator %.1f%%",
        label,
        lora["median"],
        sparse["median"],
        speedup,
        predicted,
        100 * row["estimator_share"],
    )
    return row


def hardware_header(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Machine, library versions and settings, recorded beside the results."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "sparselora": __version__,
    }


def add_lora_and_sparselora(
    model: nn.Module,
    config: BenchConfig,
    sparse_config: SparseLoRAConfig,
    vocab_size: int,
    shape: BenchShape,
    device: torch.device,
) -> tuple[nn.Module, SparseLoRA, float]:
    """PEFT LoRA from `config` (rank, alpha, targets; seeded), then SparseLoRA over it, its
    whitened estimator calibrated on synthetic batches of `shape`. Returns the PEFT model, the
    handle and the seconds SparseLoRA's setup took (estimator included)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=config.lora_targets,
            task_type="CAUSAL_LM",
        ),
    )
    calibration = None
    if sparse_config.estimator == "whitened_svd":
        calibration = [
            synthetic_batch(
                vocab_size, config.batch_size, shape, "none", config.seed + 1 + i, device
            )
            for i in range(config.calibration_batches)
        ]
    start = time.perf_counter()
    handle = apply_sparselora(peft_model, sparse_config, calibration=calibration, use_cache=False)
    return peft_model, handle, time.perf_counter() - start


def run_benchmark(config: BenchConfig, progress: bool = False) -> dict[str, Any]:
    """Measure every (shape, padding) row; returns {"header": ..., "rows": [...]}.

    Writes nothing; see `write_results`. `progress` shows a tqdm bar per row (for the CLI).
    `config.threads` applies for the duration of the call.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_benchmark(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(config: BenchConfig, progress: bool) -> dict[str, Any]:
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    sparse_config = config.sparse_config()
    shapes = [parse_shape(s) for s in config.shapes]

    model = load_bench_model(config, device, dtype)
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
    header = hardware_header(config, device, dtype)
    header.update(
        model=config.model,
        random_weights=config.random_weights,
        model_shape=dataclasses.asdict(model_shape),
        preset=sparse_config.preset or config.sparselora,
        sparselora_config=sparse_config.to_dict(),
        estimator_setup_s=setup_seconds,
        bench_config=dataclasses.asdict(config),
    )
    for row in rows:
        row["model"] = config.model
        row["preset"] = sparse_config.preset or config.sparselora
    return {"header": header, "rows": rows}


# -- output -------------------------------------------------------------------------------


def _scalar_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, (list, dict)) and key not in columns:
                columns.append(key)
    return columns


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: per (shape, padding) median step ms [min-max] of each method, measured
    and predicted speedup, estimator share, tokens/s and memory (LoRA -> SparseLoRA)."""
    header = [
        "shape (L, out)",
        "padding",
        "LoRA ms",
        "SparseLoRA ms",
        "speedup",
        "paired",
        "predicted",
        "of predicted",
        "end-to-end",
        "estimator",
        "tokens/s",
        "saved act. MiB",
        "peak MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:

        def ms(method: str, row=row) -> str:
            return (
                f"{1e3 * row[f'{method}_median_s']:.1f} "
                f"[{1e3 * row[f'{method}_min_s']:.1f}-{1e3 * row[f'{method}_max_s']:.1f}]"
            )

        def pair(key: str, spec: str, row=row) -> str:
            return f"{_fmt(row[f'lora_{key}'], spec)} → {_fmt(row[f'sparselora_{key}'], spec)}"

        cells = [
            f"{row['shape']} ({row['seq_len']}, {row['out_tokens']})",
            f"{row['padding']} ({100 * row['pad_fraction']:.0f}% pad)",
            ms("lora"),
            ms("sparselora"),
            f"{row['speedup']:.2f}x",
            f"{row['paired_speedup']:.2f}x",
            f"{row['predicted_speedup']:.2f}x",
            f"{100 * row['fraction_of_predicted']:.0f}%",
            f"{row['end_to_end_speedup']:.2f}x",
            f"{100 * row['estimator_share']:.1f}%",
            pair("tokens_per_s", ".0f"),
            pair("saved_mib", ".1f"),
            pair("peak_mib", ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Median step time per method (min-max whiskers) and measured vs predicted speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']}\npad={r['padding']}" for r in rows]
    x = list(range(len(rows)))
    width = 0.38
    fig, (times, speedups) = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(rows) + 4), 4))
    for offset, method, name in (
        (-width / 2, "lora", "LoRA"),
        (width / 2, "sparselora", "SparseLoRA"),
    ):
        medians = [1e3 * r[f"{method}_median_s"] for r in rows]
        low = [m - 1e3 * r[f"{method}_min_s"] for m, r in zip(medians, rows, strict=True)]
        high = [1e3 * r[f"{method}_max_s"] - m for m, r in zip(medians, rows, strict=True)]
        times.bar([i + offset for i in x], medians, width, yerr=[low, high], capsize=3, label=name)
    times.set_ylabel("step time (ms), median [min-max]")
    speedups.bar([i - width / 2 for i in x], [r["speedup"] for r in rows], width, label="measured")
    speedups.bar(
        [i + width / 2 for i in x],
        [r["predicted_speedup"] for r in rows],
        width,
        label="FLOPs-predicted",
    )
    speedups.axhline(1.0, color="grey", linewidth=0.8)
    speedups.set_ylabel("speedup over LoRA")
    for axis in (times, speedups):
        axis.set_xticks(x, labels)
        axis.legend()
        axis.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """bench.json (header + rows), bench.csv (scalar columns), bench.md and bench.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, header = results["rows"], results["header"]
    paths = {
        "json": out / "bench.json",
        "csv": out / "bench.csv",
        "markdown": out / "bench.md",
        "plot": out / "bench.png",
    }
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_scalar_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    machine = header["gpu"] or header["cpu"]
    title = [
        f"{Path(header['model']).name} · {Path(header['preset']).name}",
        f"{machine} · {header['dtype']}, {header['threads']} threads",
    ]
    table = format_markdown(rows)
    paths["markdown"].write_text(f"{' · '.join(title)} · {header['date']}\n\n{table}\n")
    plot_results(rows, paths["plot"], "\n".join(title))
    return paths


# -- command line -------------------------------------------------------------------------


def add_shared_arguments(parser: argparse.ArgumentParser, defaults: BenchConfig, unit: str) -> None:
    """The options `sparselora bench` and `sparselora composed` share: sparsity (preset or
    file), shapes, batch, repeats, LoRA, device, seed, output folder and verbosity. `unit`
    names what warm-up and timed steps are counted per."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--preset",
        dest="sparselora",
        metavar="NAME",
        help=f"preset (default {defaults.sparselora})",
    )
    what.add_argument("--config", dest="sparselora", metavar="FILE", help="SparseLoRA YAML/JSON")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=defaults.shapes,
        metavar="SHAPE",
        help=f"{', '.join(TASK_SHAPES)} or L,out (default: math)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup", type=int, default=defaults.warmup_steps, help=f"per {unit}")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"timed, per {unit}")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument(
        "--lora-targets", default=",".join(defaults.lora_targets), help="comma-separated"
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    parser.add_argument("--device", choices=DEVICES, default=defaults.device)
    parser.add_argument("--attn-implementation", default=defaults.attn_implementation)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--calibration-batches", type=int, default=defaults.calibration_batches)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def step_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of the step options `add_shared_arguments` defines."""
    return {
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()],
        "learning_rate": args.learning_rate,
        "dtype": args.dtype,
        "device": args.device,
        "attn_implementation": args.attn_implementation,
        "threads": args.threads,
        "calibration_batches": args.calibration_batches,
        "seed": args.seed,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselora bench",
        description="Measured training-step speed of SparseLoRA vs PEFT LoRA on the same model "
        "and batches (METHOD.md section 6).",
    )
    defaults = BenchConfig()
    parser.add_argument("--model", default=defaults.model, help="embedded name, hub id or dir")
    parser.add_argument(
        "--random-weights", action="store_true", help="random weights from the model's config"
    )
    parser.add_argument("--estimator", choices=["svd", "whitened_svd"], help="override kind")
    parser.add_argument(
        "--padding",
        nargs="+",
        default=defaults.padding,
        choices=PADDING_MODES,
        help="none, left (left-pad to L) or both (default)",
    )
    add_shared_arguments(parser, defaults, "method")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`sparselora bench`: run, print the markdown table, write JSON/CSV/markdown/PNG."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = BenchConfig(
            model=args.model,
            random_weights=args.random_weights,
            sparselora=args.sparselora or DEFAULT_PRESET,
            estimator=args.estimator,
            shapes=args.shapes,
            padding=list(dict.fromkeys(args.padding)),
            **step_fields(args),
            output_dir=args.output_dir,
        )
        config.sparse_config()  # a bad preset or file fails before the model loads
        results = run_benchmark(config, progress=True)
    except (ConfigError, OSError) as err:
        parser.error(str(err))
    paths = write_results(results, config.output_dir)
    print(format_markdown(results["rows"]))
    print(f"\nresults: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
