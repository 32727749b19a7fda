"""The run configuration of `sparselora train`: sections model / lora / sparselora / data /
training / logging, loaded from YAML with `section.key=value` overrides and validated once.

Every field carries its help text; a bad value raises one ConfigError naming
`section.field` and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparselora.config import (
    ConfigError,
    SparseLoRAConfig,
    check_choice,
    doc,
    dump_yaml,
    number_as,
    parse_yaml,
    read_yaml,
    unwrap_optional,
    yaml_problem,
)
from sparselora.recipes.data import TEMPLATES
from sparselora.recipes.loading import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    EMBEDDED_MODEL,
    METHODS,
    QUANT_TYPES_4BIT,
)

PADDING_SIDES = ("right", "left")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class ModelSection:
    name: str = field(
        default=EMBEDDED_MODEL,
        metadata=doc(
            "'smollm2-135m-instruct' or 'gemma3-270m' (embedded, offline; Gemma-3-270M is a base "
            "model under the Gemma terms of use), a Hugging Face model id (org/name), or a local "
            "directory with config.json (a name starting with /, . or ~, or with more than one /, "
            "is always a local path)."
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=doc("'auto' (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
    )
    attn_implementation: str = field(default="sdpa", metadata=doc("'sdpa' or 'eager'."))
    gradient_checkpointing: bool = field(default=False, metadata=doc("Recompute activations."))
    load_in_4bit: bool = field(
        default=False,
        metadata=doc(
            "QLoRA: load the decoder projections in bitsandbytes 4-bit (double-quantized scales, "
            "compute in model.dtype) and cast the other weights to float32 "
            "(peft.prepare_model_for_kbit_training, without its gradient checkpointing); "
            "SparseLoRA slices the dequantized weights. Needs the bitsandbytes package."
        ),
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata=doc("4-bit data type with load_in_4bit: 'nf4' or 'fp4'.")
    )


@dataclass
class LoraSection:
    r: int = field(
        default=32, metadata=doc("LoRA rank (32, as in the paper: docs/METHOD.md, section 12).")
    )
    alpha: int = field(default=64, metadata=doc("LoRA alpha (64)."))
    dropout: float = field(default=0.0, metadata=doc("LoRA dropout (0)."))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=doc("Modules that get adapters."),
    )


@dataclass
class DataSection:
    train: str = field(
        default="gsm8k:train",
        metadata=doc(
            "Training data: 'gsm8k[:train|:eval]' (embedded) or a path to an LLM-Adapters "
            ".json file or a .jsonl file (instruction/input/output, prompt/completion, messages)."
        ),
    )
    eval: str | None = field(
        default="gsm8k:eval",
        metadata=doc(
            "Held-out data in the same formats, or null: the held-out loss during training and "
            "the default data of `sparselora eval`. It does not follow data.train: training on "
            "your own file, set it (and data.task) too."
        ),
    )
    task: str = field(
        default="gsm8k",
        metadata=doc(
            "Answer rule of `sparselora eval` accuracy: gsm8k, svamp, mawps, AddSub, "
            "MultiArith, SingleEq (last number); aqua (first capital letter A-E); boolq, piqa, "
            "siqa, hellaswag, winogrande, arc-e, arc-c, obqa (first option name); humaneval. "
            "Every held-out 'answer' must fit it."
        ),
    )
    max_length: int = field(default=512, metadata=doc("Tokens per example after truncation."))
    prompt_max_length: int = field(default=256, metadata=doc("Prompt tokens kept at most."))
    template: str = field(default="auto", metadata=doc("Prompt format: auto, alpaca, chat or raw."))
    padding_side: str = field(default="right", metadata=doc("'right' or 'left'."))
    max_train_examples: int | None = field(
        default=None, metadata=doc("Train on the first N examples of data.train (null: all).")
    )
    max_eval_examples: int | None = field(
        default=None,
        metadata=doc(
            "Held-out loss during training on the first N examples of data.eval (null: all); "
            "`sparselora eval` takes --limit N instead."
        ),
    )


@dataclass
class TrainingSection:
    method: str = field(default="sparselora", metadata=doc("'lora' or 'sparselora'."))
    output_dir: str = field(default="runs/default", metadata=doc("Run folder."))
    epochs: float = field(
        default=1.0, metadata=doc("Training epochs (> 0); ignored when max_steps is set.")
    )
    max_steps: int = field(default=-1, metadata=doc("Optimizer steps; -1 uses epochs."))
    batch_size: int = field(default=4, metadata=doc("Micro-batch size per device."))
    gradient_accumulation: int = field(default=1, metadata=doc("Micro-batches per step."))
    learning_rate: float = field(default=3e-4, metadata=doc("AdamW learning rate."))
    lr_scheduler: str = field(default="cosine", metadata=doc("cosine, linear, constant, ..."))
    warmup_ratio: float = field(default=0.04, metadata=doc("Fraction of steps of LR warm-up."))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay."))
    seed: int = field(default=42, metadata=doc("Seed of data order and adapter init."))
    save_steps: int = field(default=50, metadata=doc("Checkpoint every N steps (0: never)."))
    save_total_limit: int = field(default=2, metadata=doc("Checkpoints kept (0: all)."))
    eval_steps: int = field(default=0, metadata=doc("Held-out loss every N steps (0: end)."))
    resume: bool = field(default=True, metadata=doc("Resume from the last checkpoint."))


@dataclass
class LoggingSection:
    logging_steps: int = field(default=1, metadata=doc("Log every N steps."))
    tensorboard: bool = field(default=True, metadata=doc("Write TensorBoard logs."))


@dataclass
class RunConfig:
    """A `sparselora train` run: one section per concern, each validated on construction."""

    model: ModelSection = field(
        default_factory=ModelSection, metadata=doc("The base model and how it is loaded.")
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata=doc("The PEFT LoRA adapters."))
    sparselora: dict[str, Any] = field(
        default_factory=lambda: {"preset": "smollm2-135m-gsm8k"},
        metadata=doc("SparseLoRAConfig fields, or {'preset': name} plus overrides."),
    )
    data: DataSection = field(
        default_factory=DataSection, metadata=doc("Training and held-out data, prompt format.")
    )
    training: TrainingSection = field(
        default_factory=TrainingSection, metadata=doc("Optimisation, schedule and checkpoints.")
    )
    logging: LoggingSection = field(
        default_factory=LoggingSection, metadata=doc("Logging and TensorBoard.")
    )

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.model.dtype, DTYPES)
        check_choice("model.bnb_4bit_quant_type", self.model.bnb_4bit_quant_type, QUANT_TYPES_4BIT)
        check_choice(
            "model.attn_implementation", self.model.attn_implementation, ATTN_IMPLEMENTATIONS
        )
        check_choice("data.template", self.data.template, TEMPLATES)
        check_choice("data.padding_side", self.data.padding_side, PADDING_SIDES)
        check_choice("training.method", self.training.method, METHODS)
        check_choice("training.lr_scheduler", self.training.lr_scheduler, SCHEDULERS)
        for name in ("lora.r", "lora.alpha", "data.max_length", "data.prompt_max_length",
                     "training.batch_size", "training.gradient_accumulation",
                     "logging.logging_steps"):  # fmt: skip
            _positive(name, _get(self, name))
        for name in ("data.max_train_examples", "data.max_eval_examples"):
            if _get(self, name) is not None:  # None: all examples
                _positive(name, _get(self, name))
        for name in ("training.save_steps", "training.save_total_limit", "training.eval_steps",
                     "training.seed", "training.weight_decay"):  # fmt: skip
            if _get(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {_get(self, name)!r}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout = {self.lora.dropout} must be in [0, 1)")
        if not self.training.learning_rate > 0:
            raise ConfigError(
                f"training.learning_rate must be > 0, got {self.training.learning_rate}"
            )
        if not 0.0 <= self.training.warmup_ratio < 1.0:
            raise ConfigError(
                f"training.warmup_ratio = {self.training.warmup_ratio} must be in [0, 1)"
            )
        if self.training.max_steps <= 0 and self.training.max_steps != -1:
            raise ConfigError(
                "training.max_steps must be a positive number of steps or -1 (use epochs), "
                f"got {self.training.max_steps}"
            )
        if self.training.max_steps == -1 and not self.training.epochs > 0:
            raise ConfigError(
                f"training.epochs must be > 0 (or set training.max_steps), got "
                f"{self.training.epochs}: the run would train nothing"
            )
        if not self.lora.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")
        try:
            self.sparse_config()
        except ConfigError as err:
            raise ConfigError(f"sparselora: {err}") from None

    def sparse_config(self) -> SparseLoRAConfig:
        return SparseLoRAConfig.from_dict(self.sparselora)

    def default_eval_warning(self) -> str | None:
        """What evaluation will use, when data.train is the user's data but data.eval is still
        the embedded GSM8K default (which does not follow data.train); else None."""
        data = self.data
        if data.train.lower().startswith("gsm8k") or data.eval != DataSection.eval:
            return None
        return (
            f"data.train is {data.train}, but data.eval is the default {data.eval}: the held-out "
            "loss during training and `sparselora eval` will use the embedded GSM8K held-out "
            f"problems, with answer rule data.task={data.task}. To evaluate on your task, set "
            "data.eval=YOUR_HELD_OUT_FILE and data.task=TASK (e.g. svamp, aqua, boolq, arc-c); "
            "data.eval=null turns the held-out loss off"
        )

    # -- files ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = data or {}
        _no_unknown("", data, cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "sparselora":
                if not isinstance(value, dict):
                    raise ConfigError("sparselora must be a mapping of SparseLoRAConfig fields")
                kwargs[f.name] = value
                continue
            section_cls = f.default_factory().__class__
            if not isinstance(value, dict):
                raise ConfigError(f"{f.name} must be a mapping of {section_cls.__name__} fields")
            _no_unknown(f"{f.name}.", value, section_cls)
            hints = typing.get_type_hints(section_cls)
            checked = {k: _coerce(f"{f.name}.{k}", v, hints[k]) for k, v in value.items()}
            kwargs[f.name] = section_cls(**checked)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
        """Read YAML (None: defaults), then apply `section.key=value` overrides. A file that is
        not UTF-8 or not YAML raises one ConfigError naming the file, line and column."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                problem = "is not a file" if path.exists() else "does not exist"
                raise ConfigError(f"config file {path} {problem}")
            loaded = read_yaml(path)
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping with sections {_sections()}")
            data = loaded or {}
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(dump_yaml(self.to_dict()))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply 'section.key=value' (value parsed as YAML: 1e-4 is a number) to a nested dict in
    place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(
            f"override {item!r} must name a section and a key, e.g. training.learning_rate=1e-4"
        )
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = parse_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({yaml_problem(err)}); "
            "quote it if it is a string"
        ) from None


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def _no_unknown(prefix: str, data: dict, cls) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {[prefix + u for u in unknown]}; allowed: {sorted(known)}"
        )


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against a simple type hint (int, float, bool, str, list[str], X | None).

    An integral float is an int (`1e3`), an int a float; floats must be finite."""
    if value is None and unwrap_optional(hint) is not hint:
        return None
    hint = unwrap_optional(hint)
    value = number_as(hint, value)
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return value
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _positive(name: str, value: Any) -> None:
    if value is None or value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value!r}")


def _get(config: RunConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)
