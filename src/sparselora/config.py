"""`SparseLoRAConfig`: what to sparsify, how to choose channels, and when.

Every field carries its help text in `metadata["help"]`. The config is validated once, on
construction; inner code trusts it. Sparsity values are the fraction of channels REMOVED, as in
the paper (0.9 keeps 10%).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparselora.presets import PAPER_ESTIMATOR, PAPER_SUFFIX, PRESETS

ESTIMATOR_KINDS = ("svd", "whitened_svd")
FFN_CRITERIA = ("seq_mean", "per_token", "oracle", "random")
ATTN_CRITERIA = ("norm", "oracle", "random")
IGNORE_INDEX = -100  # label value the loss ignores (prompt tokens, padding)
OUTPUT_TOKEN_MODES = ("dense", "dense_labelled", "sparse")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def parse_layer_spec(spec: str | int) -> list[int] | None:
    """Turn `"13-29"`, `"3,5,7-9"`, `12` or `"all"` into a sorted list of 0-based layers.

    Returns None for "all" (resolved against the model depth later).
    """
    if isinstance(spec, bool):
        raise ConfigError(f"layer spec {spec!r} must be an int, 'a-b', 'a,b,c' or 'all'")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"layer index {spec} must be >= 0")
        return [spec]
    text = str(spec).strip().lower()
    if text == "all":
        return None
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if lo > hi or lo < 0:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            else:
                value = int(part)
                if value < 0:
                    raise ValueError
                layers.add(value)
        except ValueError:
            raise ConfigError(
                f"layer spec {spec!r} is not understood; use an int, 'a-b' (inclusive, "
                "0-based), a comma list such as '3,5,7-9', or 'all'"
            ) from None
    return sorted(layers)


def _normalise_sparsity(name: str, value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"all": value}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{name} must be a number (every layer) or a mapping of layer spec -> sparsity, "
            f"got {type(value).__name__}"
        )
    out: dict[str, float] = {}
    for spec, sparsity in value.items():
        try:
            parse_layer_spec(spec)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise ConfigError(f"{name}[{spec!r}] must be a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(
                f"{name}[{spec!r}] = {sparsity} is outside [0, 1): it is the fraction of "
                "channels removed, so 0 is dense and 0.99 keeps 1%"
            )
        out[str(spec)] = float(sparsity)
    return out


def resolve_layers(name: str, sparsity: dict[str, float], num_layers: int) -> dict[int, float]:
    """Map a layer-spec dict onto concrete layer indices of a model with `num_layers` layers.

    Later entries override earlier ones. Layers with sparsity 0 are dropped (they run dense).
    Raises ConfigError when a layer index is beyond the model depth.
    """
    per_layer: dict[int, float] = {}
    for spec, value in sparsity.items():
        layers = parse_layer_spec(spec)
        if layers is None:
            layers = list(range(num_layers))
        too_deep = [i for i in layers if i >= num_layers]
        if too_deep:
            raise ConfigError(
                f"{name}[{spec!r}] names layer {too_deep[0]}, but the model has {num_layers} "
                f"layers (valid indices 0-{num_layers - 1}); is this preset for another model?"
            )
        for i in layers:
            per_layer[i] = value
    return {i: s for i, s in sorted(per_layer.items()) if s > 0.0}


def doc(text: str) -> dict[str, str]:
    """Field metadata holding the field's help text.

    Every config dataclass of the project documents its fields this way, and this text is the
    only copy: `sparselora ... --help` and docs/CONFIG.md are generated from it.
    """
    return {"help": text}


def unwrap_optional(hint: Any) -> Any:
    """`X | None` (or Optional[X]) -> X; any other hint unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def number_as(hint: Any, value: Any) -> Any:
    """`value` as a field of type `hint` takes a number from YAML or the command line: an
    integral float (`1e3`, `2.0`) becomes an int for an int field, an int a float for a float
    field. Anything else comes back unchanged, for the field's own check to accept or refuse."""
    if isinstance(value, bool):
        return value
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value


@dataclass
class SparseLoRAConfig:
    """Configuration of SparseLoRA's contextual sparsity on the frozen main branch."""

    ffn_sparsity: dict[str, float] = field(
        default_factory=dict,
        metadata=doc(
            "Fraction of FFN (gate/up/down) channels removed, per layer: a number for every "
            "layer, or a mapping such as {'13-29': 0.9, 31: 0.5} (0-based, inclusive ranges)."
        ),
    )
    attn_sparsity: dict[str, float] = field(
        default_factory=dict,
        metadata=doc(
            "Fraction of attention projection channels removed (Q/K channels, V/O channels), "
            "per layer; same format as ffn_sparsity."
        ),
    )
    estimator: str = field(
        default="whitened_svd",
        metadata=doc(
            "Sparsity estimator: 'svd' (the paper's: rank-r SVD of the weights alone) or "
            "'whitened_svd' (rank-r SVD fitted to the real input covariance, calibrated on "
            "the first training batches or on given calibration data)."
        ),
    )
    estimator_rank: int = field(default=8, metadata=doc("Rank r of the estimator factors."))
    ffn_criterion: str = field(
        default="per_token",
        metadata=doc(
            "FFN channel score: 'seq_mean' (the paper's: activations of each sequence's mean "
            "input, L2 over the batch), 'per_token' (L2 of the estimated activations over all "
            "real tokens), 'oracle' (true activations, dense; for ablations), 'random'."
        ),
    )
    attn_criterion: str = field(
        default="norm",
        metadata=doc(
            "Attention channel score: 'norm' (the paper's: ||Q_c||*||K_c|| for Q/K and ||V_c|| "
            "for V/O on estimated projections), 'oracle' (true projections), 'random'."
        ),
    )
    max_score_tokens: int | None = field(
        default=256,
        metadata=doc(
            "Score channels on at most this many real tokens per micro-batch (evenly strided; "
            "null: all). Bounds the per-token estimator's cost on long batches and small "
            "models; the oracle criterion uses it too."
        ),
    )
    exclude_padding: bool = field(
        default=True,
        metadata=doc(
            "Score channels on real tokens only. False reproduces the reference, whose "
            "sequence mean includes padding tokens."
        ),
    )
    output_tokens: str = field(
        default="dense",
        metadata=doc(
            "'dense': the positions whose logits enter the loss (those predicting a token "
            "with label != -100) run the full model; 'dense_labelled': the positions holding "
            "a labelled token run dense (the reference code's alignment, one position late); "
            "'sparse': every token is sparse (an ablation; hurts accuracy)."
        ),
    )
    sparse_without_labels: bool = field(
        default=False,
        metadata=doc(
            "With no labels in the forward call (generation, custom losses), run sparse on "
            "every real token instead of dense."
        ),
    )
    sparse_in_eval: bool = field(
        default=False,
        metadata=doc("Stay sparse when the model is in eval mode (default: eval is dense)."),
    )
    start_step: float = field(
        default=0.05,
        metadata=doc("Fraction of optimizer steps run dense before sparsity starts."),
    )
    end_step: float = field(
        default=1.0,
        metadata=doc("Fraction of optimizer steps after which training returns to dense."),
    )
    sparse_lora_branch: bool = field(
        default=False,
        metadata=doc(
            "Also restrict the LoRA branches of gate/up/down to the kept FFN channels. "
            "Default False keeps LoRA dense, as in the paper."
        ),
    )
    detach_sparse_base: bool = field(
        default=False,
        metadata=doc(
            "Cut the input gradient through the sparse frozen projections, reproducing the "
            "reference code's no_grad bug. For comparison only."
        ),
    )
    labelled_logits: bool = field(
        default=True,
        metadata=doc(
            "Exact saving: in training forwards with labels, run the LM head and the loss only "
            "at the positions that predict a labelled token. Loss and gradients are unchanged; "
            "the returned logits are then those positions only, flattened to (N, vocab)."
        ),
    )
    skip_unread_last_layer: bool = field(
        default=True,
        metadata=doc(
            "Exact saving: in the last decoder layer, positions whose output no loss reads "
            "(context, padding) compute only their keys and values; their query, o_proj and "
            "FFN are skipped. Loss and gradients are unchanged."
        ),
    )
    calibration_tokens: int = field(
        default=8192,
        metadata=doc(
            "whitened_svd: number of real tokens whose input covariance fits the factors."
        ),
    )
    calibration_damping: float = field(
        default=1e-2,
        metadata=doc(
            "whitened_svd: ridge added to the input covariance, relative to its mean diagonal."
        ),
    )
    seed: int = field(default=0, metadata=doc("Seed of the 'random' criteria."))
    preset: str | None = field(
        default=None,
        metadata=doc(
            "The preset this config came from, if any: a name (`sparselora presets list`) or a "
            "preset file (.yaml/.yml/.json, as `sparselora calibrate` writes)."
        ),
    )

    def __post_init__(self) -> None:
        self.ffn_sparsity = _normalise_sparsity("ffn_sparsity", self.ffn_sparsity)
        self.attn_sparsity = _normalise_sparsity("attn_sparsity", self.attn_sparsity)
        for name, allowed in (
            ("estimator", ESTIMATOR_KINDS),
            ("ffn_criterion", FFN_CRITERIA),
            ("attn_criterion", ATTN_CRITERIA),
            ("output_tokens", OUTPUT_TOKEN_MODES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str):  # a list would pass check_choice
                raise ConfigError(f"{name} = {value!r} is not allowed; choose from {list(allowed)}")
            check_choice(name, value, allowed)
        if self.preset is not None and not isinstance(self.preset, str):
            raise _not_a_preset(self.preset)
        check_int("estimator_rank", self.estimator_rank, minimum=1)
        check_int("calibration_tokens", self.calibration_tokens, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.max_score_tokens is not None:
            check_int("max_score_tokens", self.max_score_tokens, minimum=1)
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a fraction in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} = {value} is outside [0, 1] (a fraction of steps)")
        if self.start_step > self.end_step:
            raise ConfigError(
                f"start_step ({self.start_step}) must not exceed end_step ({self.end_step})"
            )
        damping = self.calibration_damping
        if (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not math.isfinite(damping)
            or damping < 0.0
        ):
            raise ConfigError(f"calibration_damping must be a number >= 0, got {damping!r}")
        for name in (
            "exclude_padding",
            "sparse_without_labels",
            "sparse_in_eval",
            "sparse_lora_branch",
            "detach_sparse_base",
            "labelled_logits",
            "skip_unread_last_layer",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseLoRAConfig:
        """Build from a plain dict (a YAML file, run-config overrides); `preset: name`
        starts from that preset, keys override it. Numbers are taken as their fields' types
        (`number_as`: `estimator_rank: 1.6e1` is 16)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown SparseLoRA config field(s) {unknown}; allowed: {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        data = {k: number_as(unwrap_optional(hints[k]), v) for k, v in data.items()}
        preset = data.get("preset")
        if preset is not None:
            base = dataclasses.asdict(get_preset(preset))
            base.update(data)
            data = base
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SparseLoRAConfig:
        """A named preset (see `sparselora.presets`), with optional field overrides."""
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def load(cls, path: str | Path) -> SparseLoRAConfig:
        """Load from a .yaml/.yml or .json file. A file that is not UTF-8, YAML or JSON raises
        one ConfigError naming the file, line and column."""
        path = Path(path)
        if path.suffix == ".json":
            try:
                data = json.loads(read_text(path))
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{path}, line {err.lineno}, column {err.colno}: not valid JSON: {err.msg}"
                ) from None
        else:
            data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of SparseLoRA config fields")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Save as YAML (.yaml/.yml) or JSON (any other suffix)."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(dump_yaml(data))
        else:
            path.write_text(json.dumps(data, indent=2) + "\n")

    # -- derived -------------------------------------------------------------------------

    def layer_sparsity(self, num_layers: int) -> tuple[dict[int, float], dict[int, float]]:
        """(FFN, attention) sparsity per sparsified layer for a model of `num_layers` layers."""
        return (
            resolve_layers("ffn_sparsity", self.ffn_sparsity, num_layers),
            resolve_layers("attn_sparsity", self.attn_sparsity, num_layers),
        )

    def at_depth(self, source_layers: int, target_layers: int) -> SparseLoRAConfig:
        """This config, written for a model of `source_layers` layers, moved to one of
        `target_layers` layers by relative depth.

        Target layer j takes the sparsity of source layer round(j * (S-1) / (T-1)), so the
        first and last layers map onto each other and a dense band stays a band. A preset for
        one model is a starting point for another, not a measured preset (see
        `sparselora calibrate` in a later version, docs/METHOD.md section 9).
        """
        if source_layers < 2 or target_layers < 2:
            raise ConfigError("at_depth needs models of at least 2 layers")
        ffn, attn = self.layer_sparsity(source_layers)

        def moved(per_layer: dict[int, float]) -> dict[str, float]:
            scale = (source_layers - 1) / (target_layers - 1)
            chosen = {j: per_layer.get(round(j * scale)) for j in range(target_layers)}
            return compact_layers({j: s for j, s in chosen.items() if s})

        return dataclasses.replace(self, ffn_sparsity=moved(ffn), attn_sparsity=moved(attn))


def compact_layers(per_layer: dict[int, float]) -> dict[str, float]:
    """{13: 0.9, 14: 0.9, 15: 0.9, 20: 0.5} -> {"13-15": 0.9, "20": 0.5}: runs of consecutive
    layers with the same sparsity as one inclusive range."""
    out: dict[str, float] = {}
    run: list[int] = []
    for layer in sorted(per_layer) + [None]:
        if run and (layer is None or layer != run[-1] + 1 or per_layer[layer] != per_layer[run[0]]):
            out[f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0])] = per_layer[run[0]]
            run = []
        if layer is not None:
            run.append(layer)
    return out


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise one ConfigError naming the field and the allowed values.

    `value` is one value, or a list of values that must be non-empty and each allowed.
    """
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        shown = value if not isinstance(value, list) or not values else bad
        raise ConfigError(f"{name} = {shown!r} is not allowed; choose from {list(allowed)}")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise one ConfigError unless `value` is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


PRESET_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def get_preset(name: str) -> SparseLoRAConfig:
    """The SparseLoRAConfig of preset `name` (":paper" suffix: the paper's estimator settings),
    or of a preset file (a .yaml/.yml/.json path, such as `sparselora calibrate` writes).

    A ConfigError lists the known names.
    """
    if not isinstance(name, str):
        raise _not_a_preset(name)
    if Path(name).suffix in PRESET_FILE_SUFFIXES:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"preset file {name} does not exist")
        loaded = SparseLoRAConfig.load(path)
        return dataclasses.replace(loaded, preset=name)
    base, paper = (
        (name[: -len(PAPER_SUFFIX)], True) if name.endswith(PAPER_SUFFIX) else (name, False)
    )
    if base not in PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}; available: {sorted(PRESETS)} (each also with '{PAPER_SUFFIX}')"
        )
    preset = PRESETS[base]
    fields = {**preset.fields, **(PAPER_ESTIMATOR if paper else {})}
    return SparseLoRAConfig(preset=name, **fields)


def _not_a_preset(value: Any) -> ConfigError:
    return ConfigError(
        f"preset = {value!r} is not a preset name or file; choose from {sorted(PRESETS)} (each "
        f"also with '{PAPER_SUFFIX}') or a preset file ({', '.join(PRESET_FILE_SUFFIXES)})"
    )


# -- config files ----------------------------------------------------------------------------
# YAML as YAML 1.2 and Python read it, where PyYAML follows YAML 1.1: `1e-4` is a number (YAML
# 1.1 needs `1.0e-4`, and our own examples write `learning_rate=1e-4`), and a key given twice is
# an error (YAML 1.1 keeps the last silently, dropping a whole section).

_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
)  # tried after PyYAML's own int and float patterns, so `3` stays an int


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with `_FLOAT` numbers and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first[key].line + 1})",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes the strings `_Loader` would read as numbers, so files round-trip."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """`text` parsed as YAML (see above); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def yaml_problem(err: yaml.YAMLError) -> str:
    """The problem of a YAML error in one line, without PyYAML's `in "<unicode string>"`."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        problem = err.problem
        if err.context:
            mark = err.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem += f" ({err.context}{where})"
        return problem
    if isinstance(err, yaml.reader.ReaderError):
        return f"unacceptable character #x{err.character:04x}: {err.reason}"
    return " ".join(str(err).split())


def read_text(path: Path, error: type[ValueError] = ConfigError) -> str:
    """The UTF-8 text of file `path` (a leading byte-order mark dropped). A byte that is not
    UTF-8 raises `error` naming the line and column (in characters, 1-based) and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[line_start : err.start].decode("utf-8")) + 1
        raise error(
            f"{path}, line {line}, column {column}: not UTF-8 text (byte 0x{data[err.start]:02x}: "
            f"{err.reason}); save the file as UTF-8"
        ) from None


def read_yaml(path: Path) -> Any:
    """The YAML document of file `path`. A file that is not UTF-8 or not YAML raises one
    ConfigError naming the file, line and column."""
    text = read_text(path)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            line, column = mark.line + 1, mark.column + 1
        else:  # a ReaderError: a position in the text
            position = getattr(err, "position", 0)
            line = text.count("\n", 0, position) + 1
            column = position - text.rfind("\n", 0, position)
        raise ConfigError(
            f"{path}, line {line}, column {column}: not valid YAML: {yaml_problem(err)}"
        ) from None
