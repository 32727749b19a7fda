"""The measurement sub-commands: `sparselora flops`, `sparselora bench`, `sparselora composed`.

`register(subparsers)` adds them to the `sparselora` argparse tree; each handler takes the parsed
arguments, builds the config (validated there), calls the `sparselora.perf` function, prints the
markdown table and the written files, and returns the exit code (2 for a bad value, with one
message naming the field and what is allowed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from sparselora.cli.options import CommaListAction, add_dataclass_options, dataclass_from_args
from sparselora.config import ConfigError, SparseLoRAConfig, get_preset
from sparselora.engine.flops import compare, flops_table, preset_task
from sparselora.engine.shapes import DEFAULT_LORA_TARGETS, TASK_SHAPES, load_shape
from sparselora.perf.bench import BenchConfig, run_benchmark
from sparselora.perf.composed import ComposedConfig, run_composed
from sparselora.perf.report import (
    bench_markdown,
    composed_markdown,
    flops_markdown,
    write_bench,
    write_composed,
)
from sparselora.presets import PAPER_SUFFIX, PRESETS

SPEED_PROTOCOL = "see docs/METHOD.md, FLOPs accounting and the speed protocol"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `flops`, `bench` and `composed`, each with `func` set to its handler."""
    _add_flops(subparsers)

    p = subparsers.add_parser(
        "bench",
        help="measured step time, LoRA vs SparseLoRA",
        description="Measured training-step speed of SparseLoRA vs PEFT LoRA on the same model "
        f"and batches; {SPEED_PROTOCOL}.",
    )
    _add_measure_options(p, BenchConfig)
    p.set_defaults(func=_bench)

    p = subparsers.add_parser(
        "composed",
        help="step time composed from measured parts, for large models",
        description="Composed training-step time of SparseLoRA vs PEFT LoRA for a model too "
        "large to run whole: one layer per kind, LM head, optimizer, timed and summed; "
        f"{SPEED_PROTOCOL}.",
    )
    _add_measure_options(p, ComposedConfig)
    p.set_defaults(func=_composed)


def _fail(command: str, err: Exception) -> int:
    print(f"sparselora {command}: error: {err}", file=sys.stderr)
    return 2


def _print_paths(paths: dict) -> None:
    print(f"\nresults: {', '.join(str(p) for p in paths.values())}")


# -- bench and composed ----------------------------------------------------------------------


def _add_measure_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of `cls`; the SparseLoRA config (field `sparselora`) is given as
    `--preset NAME` or `--config FILE`, warmup_steps as `--warmup`."""
    field = {f.name: f for f in dataclasses.fields(cls)}["sparselora"]
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--preset",
        dest="sparselora",
        metavar="NAME",
        help=f"A SparseLoRA preset name (default: {field.default}).",
    )
    what.add_argument(
        "--config",
        dest="sparselora",
        metavar="FILE",
        help="A SparseLoRA config file (.yaml/.yml/.json), instead of --preset.",
    )
    parser.set_defaults(sparselora=field.default)
    add_dataclass_options(
        parser,
        cls,
        rename={"warmup_steps": "warmup"},
        skip={"sparselora"},
        keep_commas={"shapes"},  # a custom shape is "L,out"
    )


def _bench(args: argparse.Namespace) -> int:
    try:
        config = dataclass_from_args(BenchConfig, args)
        config.sparse_config()  # a bad preset or file fails before the model loads
        results = run_benchmark(config, progress=True)
    except (ConfigError, OSError) as err:
        return _fail("bench", err)
    paths = write_bench(results, config.output_dir)
    print(bench_markdown(results.rows))
    _print_paths(paths)
    return 0


def _composed(args: argparse.Namespace) -> int:
    try:
        config = dataclass_from_args(ComposedConfig, args)
        config.sparse_config()  # a bad preset or file fails before any model is built
        results = run_composed(config, progress=True)
    except (ConfigError, OSError) as err:
        return _fail("composed", err)
    paths = write_composed(results, config.output_dir)
    print(composed_markdown(results))
    _print_paths(paths)
    return 0


# -- flops -----------------------------------------------------------------------------------


def _add_flops(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="analytic training FLOPs of LoRA vs SparseLoRA",
        description="Analytic training-step FLOPs of LoRA and SparseLoRA (no weights needed); "
        f"{SPEED_PROTOCOL}.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--preset",
        choices=sorted(PRESETS) + sorted(f"{name}{PAPER_SUFFIX}" for name in PRESETS),
        metavar="NAME",
        help=f"a named SparseLoRA preset ({PAPER_SUFFIX!r} suffix: the paper's estimator): "
        f"{', '.join(sorted(PRESETS))}",
    )
    what.add_argument("--config", help="a SparseLoRA config file (.yaml or .json)")
    what.add_argument("--all-presets", action="store_true", help="every preset on its paper model")
    parser.add_argument(
        "--model",
        help="model id or alias of a paper model, or a local directory with config.json "
        "(default: the preset's model)",
    )
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="move the preset to --model's depth by relative depth (a preset written for a "
        "32-layer model on a 36-layer one: SparseLoRAConfig.at_depth)",
    )
    parser.add_argument(
        "--task", choices=sorted(TASK_SHAPES), help="benchmark shape (default: the preset's)"
    )
    parser.add_argument(
        "--all-tasks", action="store_true", help="with --all-presets: every task's shape"
    )
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (overrides --task)")
    parser.add_argument("--out-tokens", type=int, help="labelled tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument(
        "--lora-targets",
        nargs="+",
        action=CommaListAction,
        default=list(DEFAULT_LORA_TARGETS),
        help="adapted projections, space- or comma-separated (default q_proj,k_proj,v_proj,o_proj)",
    )
    parser.add_argument(
        "--logits-on-output-only",
        action="store_true",
        help="count the LM head only on positions whose next token is labelled",
    )
    parser.add_argument(
        "--no-exact-savings",
        action="store_true",
        help="SparseLoRA without the exact savings (labelled logits, last-layer skip): the "
        "paper's channel sparsity alone",
    )
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.set_defaults(func=_flops)


def _flops(args: argparse.Namespace) -> int:
    """Print LoRA vs SparseLoRA step FLOPs as a markdown table or JSON."""
    common = {
        "batch": args.batch,
        "lora_rank": args.lora_rank,
        "lora_targets": tuple(args.lora_targets),
        "logits_on_output_only": args.logits_on_output_only,
        "exact_savings": not args.no_exact_savings,
    }
    try:
        rows = _flops_rows(args, common)
    except (ConfigError, ValueError, OSError) as err:
        return _fail("flops", err)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(flops_markdown(rows))
    return 0


def _flops_rows(args: argparse.Namespace, common: dict) -> list[dict]:
    if args.all_presets:
        if args.model or args.seq_len is not None or args.out_tokens is not None:
            raise ValueError("--all-presets counts each preset on its own model and task shapes")
        tasks = list(TASK_SHAPES) if args.all_tasks else ([args.task] if args.task else None)
        return flops_table(tasks=tasks, **common)
    config = get_preset(args.preset) if args.preset else SparseLoRAConfig.load(args.config)
    base_name = config.preset.removesuffix(PAPER_SUFFIX) if config.preset else None
    preset = PRESETS.get(base_name) if base_name else None
    if args.model is None and preset is None:
        raise ValueError("--model is needed for a config that names no preset")
    model = args.model or preset.model
    task = args.task or (preset_task(preset.name) if preset else "math")
    seq_len, out_tokens = TASK_SHAPES[task]
    if args.seq_len is not None:
        seq_len, task = args.seq_len, "custom"
    if args.out_tokens is not None:
        out_tokens, task = args.out_tokens, "custom"
    shape = load_shape(model)
    name = config.preset or args.config
    if args.transfer:
        if preset is None:
            raise ValueError("--transfer moves a preset; --config names no preset's depth")
        if preset.num_layers != shape.num_layers:
            config = config.at_depth(preset.num_layers, shape.num_layers)
            name = f"{name} @ {shape.num_layers} layers"
    row = {"preset": name, "model": model, "task": task}
    row.update(compare(shape, seq_len, out_tokens, config, **common))
    return [row]
