"""What `sparselora bench` and `sparselora composed` share: batch shapes and synthetic batches,
the configuration fields of a measurement, the A B B A pair order, timing, the bytes autograd
saves, LoRA + SparseLoRA set-up, and the machine header written beside every result.

The speed protocol is described in docs/METHOD.md (FLOPs accounting and the speed protocol).
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import torch
from torch import nn

from sparselora.config import (
    ESTIMATOR_KINDS,
    IGNORE_INDEX,
    ConfigError,
    SparseLoRAConfig,
    check_choice,
    check_int,
    doc,
    get_preset,
)
from sparselora.engine.handle import SparseLoRA, apply_sparselora
from sparselora.engine.shapes import STAGE, TASK_SHAPES
from sparselora.recipes.loading import (
    ATTN_IMPLEMENTATIONS,
    DEVICES,
    DTYPES,
    EMBEDDED_MODEL,
    METHODS,
    add_lora,
    resolve_device,
)
from sparselora.version import __version__

T = TypeVar("T")

PAD_TOKEN_ID = 0
MIB = 2**20
KEEP_ESTIMATOR = "config"  # the `estimator` value that keeps the SparseLoRA config's own kind


# -- batch shapes and synthetic batches ----------------------------------------------------


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
    try:
        seq_len, out_tokens = (int(p) for p in text.split(","))
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


# -- configuration -------------------------------------------------------------------------


@dataclass
class MeasureConfig:
    """The fields `BenchConfig` and `ComposedConfig` share; validated on construction."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata=doc("The embedded model's name, a Hugging Face id or a local directory."),
    )
    sparselora: str = field(
        default="smollm2-135m-gsm8k",
        metadata=doc("A preset name, or a SparseLoRA config file (.yaml/.yml/.json)."),
    )
    estimator: str = field(
        default=KEEP_ESTIMATOR,
        metadata=doc(
            f"Estimator kind, one of {list(ESTIMATOR_KINDS)}, or '{KEEP_ESTIMATOR}' to keep "
            "the SparseLoRA config's own."
        ),
    )
    shapes: list[str] = field(
        default_factory=lambda: ["math"],
        metadata=doc(f"Batch shapes: names {list(TASK_SHAPES)} or custom 'L,out'."),
    )
    batch_size: int = field(default=1, metadata=doc("Rows per step."))
    warmup_steps: int = field(default=2, metadata=doc("Untimed steps per method and row."))
    steps: int = field(default=5, metadata=doc("Timed steps per method and row."))
    lora_rank: int = field(default=32, metadata=doc("LoRA rank r."))
    lora_alpha: int = field(default=64, metadata=doc("LoRA alpha."))
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=doc(f"Projections with LoRA adapters, of {list(STAGE)}."),
    )
    learning_rate: float = field(default=1e-4, metadata=doc("AdamW learning rate."))
    dtype: str = field(
        default="auto",
        metadata=doc(f"One of {list(DTYPES)}; auto is float32 on CPU, bfloat16 on CUDA."),
    )
    device: str = field(
        default="auto", metadata=doc(f"One of {list(DEVICES)}; auto is CUDA if available.")
    )
    attn_implementation: str = field(
        default="sdpa", metadata=doc(f"Attention kernel, one of {list(ATTN_IMPLEMENTATIONS)}.")
    )
    threads: int | None = field(
        default=None, metadata=doc("torch CPU threads during the run (null: torch's choice).")
    )
    calibration_batches: int = field(
        default=2,
        metadata=doc("whitened_svd: synthetic batches fitted before the first step."),
    )
    seed: int = field(default=0, metadata=doc("Seed of the synthetic batches and LoRA init."))
    output_dir: str = field(default="runs/bench", metadata=doc("Folder for the result files."))

    def __post_init__(self) -> None:
        self.shapes = list(self.shapes)
        self.lora_targets = list(self.lora_targets)
        if not self.shapes:
            raise ConfigError(f"shapes is empty; choose from {list(TASK_SHAPES)} or 'L,out'")
        for shape in self.shapes:
            parse_shape(shape)
        check_choice("lora_targets", self.lora_targets, tuple(STAGE))
        check_choice("estimator", self.estimator, (*ESTIMATOR_KINDS, KEEP_ESTIMATOR))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        for name, minimum in (
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("steps", 1),
            ("lora_rank", 1),
            ("lora_alpha", 1),
            ("calibration_batches", 1),
            ("seed", 0),
        ):
            check_int(name, getattr(self, name), minimum)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if isinstance(self.learning_rate, bool) or not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        try:
            resolve_device(self.device)
        except ValueError as err:
            raise ConfigError(f"device = {self.device!r}: {err}") from None

    def sparse_config(self) -> SparseLoRAConfig:
        """The SparseLoRA config named by `sparselora` (file or preset), with `estimator`."""
        path = Path(self.sparselora)
        if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
            config = SparseLoRAConfig.load(path)
        else:
            config = get_preset(self.sparselora)
        if self.estimator != KEEP_ESTIMATOR:
            config = dataclasses.replace(config, estimator=self.estimator)
        return config


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """`threads` torch CPU threads inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_lora_and_sparselora(
    model: nn.Module,
    config: MeasureConfig,
    sparse_config: SparseLoRAConfig,
    vocab_size: int,
    shape: BenchShape,
    device: torch.device,
) -> tuple[nn.Module, SparseLoRA, float]:
    """PEFT LoRA from `config` (rank, alpha, targets; seeded), then SparseLoRA over it, its
    whitened estimator calibrated on synthetic batches of `shape`. Returns the PEFT model, the
    handle and the seconds SparseLoRA's setup took (estimator included)."""
    peft_model = add_lora(
        model, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed
    )
    calibration = None
    if sparse_config.estimator == "whitened_svd":
        calibration = [
            synthetic_batch(
                vocab_size, config.batch_size, shape, "none", config.seed + 1 + i, device
            )
            for i in range(config.calibration_batches)
        ]
    start = perf_counter()
    handle = apply_sparselora(peft_model, sparse_config, calibration=calibration, use_cache=False)
    return peft_model, handle, perf_counter() - start


# -- timing --------------------------------------------------------------------------------


def pair_schedule(warmup: int, steps: int) -> list[tuple[bool, tuple[str, str]]]:
    """(timed, method order) of each of `warmup` untimed then `steps` timed pairs.

    The order alternates A B, B A, A B, ... (A = LoRA) over all pairs, so each method goes first
    in every other pair: an order effect (a step running faster after the other method's step)
    cancels instead of favouring one method, and slow drifts of a shared machine hit both alike.
    """
    return [(i >= warmup, METHODS if i % 2 == 0 else METHODS[::-1]) for i in range(warmup + steps)]


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """`run()`'s result and its wall seconds, with the device synchronised on both sides."""
    sync_device(device)
    start = perf_counter()
    result = run()
    sync_device(device)
    return result, perf_counter() - start


@dataclass
class Timing:
    """Median, min and max seconds of one method's timed repeats."""

    median_s: float
    min_s: float
    max_s: float

    @classmethod
    def of(cls, seconds: Sequence[float], /, **more: Any):
        """From the timed seconds; `more` fills a subclass's other fields."""
        return cls(statistics.median(seconds), min(seconds), max(seconds), **more)


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


# -- the machine ---------------------------------------------------------------------------


def hardware_header(device: torch.device | None = None) -> dict[str, Any]:
    """Date, machine (CPU, GPU, threads, platform) and library versions: recorded beside every
    result, and what `sparselora env` prints. `device`: the device measured on (default: the
    first GPU when torch sees one, else the CPU)."""
    import accelerate
    import peft
    import transformers

    if device is None:
        device = resolve_device("auto")
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cuda = device.type == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "sparselora": __version__,
    }
