"""The `sparselora` command line: train, eval, export, estimator build, presets, flops, bench,
composed, env."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

from sparselora.config import ConfigError

EPILOG = "Run `sparselora COMMAND --help` for the options of each command."


def configure_logging(verbose: bool) -> None:
    """The format and level every `sparselora` subcommand logs with."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from sparselora.recipes.run_config import RunConfig
    from sparselora.recipes.train import train

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # no config file, only overrides
        args.config = None
    if args.method:
        overrides.append(f"training.method={args.method}")
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    config = RunConfig.load(args.config, overrides)
    summary = train(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "train_loss_curve"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from sparselora.recipes.commands import evaluate_run

    result = evaluate_run(
        Path(args.run_dir),
        data=args.data,
        task=args.task,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sparselora.recipes.commands import export_merged

    if not args.merged:
        print("export writes a merged model; pass --merged", file=sys.stderr)
        return 2
    path = export_merged(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"merged model written to {path}")
    return 0


def _cmd_estimator(args: argparse.Namespace) -> int:
    from sparselora.recipes.commands import build_estimator_file

    path = build_estimator_file(
        args.model, args.config, args.preset, args.kind, args.rank, args.output, args.data
    )
    print(f"estimator written to {path}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from sparselora.config import get_preset
    from sparselora.presets import PRESETS

    if args.action == "list" or args.name is None:
        width = max(len(n) for n in PRESETS)
        for name, preset in PRESETS.items():
            print(f"{name:<{width}}  {preset.description}  ({preset.model})")
        return 0
    print(json.dumps(get_preset(args.name).to_dict(), indent=2))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    import accelerate
    import peft
    import torch
    import transformers

    from sparselora.version import __version__

    info = {
        "sparselora": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "threads": torch.get_num_threads(),
    }
    for key, value in info.items():
        print(f"{key:13s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselora",
        description="Faster LoRA fine-tuning with contextual sparsity (SparseLoRA).",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune with LoRA or SparseLoRA from a YAML config")
    p.add_argument(
        "config", nargs="?", help="YAML with sections model/lora/sparselora/data/training/logging"
    )
    p.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=20"
    )
    p.add_argument("--method", choices=["lora", "sparselora"], help="override training.method")
    p.add_argument("--output-dir", help="override training.output_dir")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="held-out loss and accuracy of a trained run (dense)")
    p.add_argument("run_dir")
    p.add_argument("--data", help="held-out data (default: the run's data.eval)")
    p.add_argument("--task", help="answer rule (default: the run's data.task)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="merge the adapter into the base model")
    p.add_argument("run_dir")
    p.add_argument("--merged", action="store_true", help="write a merged model (required)")
    p.add_argument("--output", help="folder (default: RUN_DIR/merged)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("estimator", help="estimator files")
    est = p.add_subparsers(dest="action", required=True)
    b = est.add_parser("build", help="build the estimator for a model and sparsity config")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--config", help="SparseLoRA config YAML/JSON")
    b.add_argument("--preset", help="preset name instead of --config")
    b.add_argument("--kind", choices=["svd", "whitened_svd"])
    b.add_argument("--rank", type=int)
    b.add_argument("--data", default="gsm8k:train", help="calibration data for whitened_svd")
    b.add_argument("--output", help="file (default: the estimator cache)")
    b.set_defaults(func=_cmd_estimator)

    p = sub.add_parser("presets", help="list presets or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_presets)

    # `flops` is dispatched before parsing (its own parser); listed here for --help.
    sub.add_parser("flops", help="analytic training FLOPs of LoRA vs SparseLoRA (flops --help)")
    sub.add_parser("bench", help="measured step time, LoRA vs SparseLoRA (bench --help)")
    sub.add_parser(
        "composed", help="step time composed from measured parts, for large models (--help)"
    )

    p = sub.add_parser("env", help="versions, for bug reports")
    p.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["flops"]:  # its own parser: argparse.REMAINDER would drop --options
        from sparselora.engine import flops

        return flops.main(argv[1:]) or 0
    if argv[:1] == ["bench"]:
        from sparselora.perf import bench

        return bench.main(argv[1:]) or 0
    if argv[:1] == ["composed"]:
        from sparselora.perf import composed

        return composed.main(argv[1:]) or 0
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may follow --method / --output-dir
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if "=" not in item or item.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"sparselora: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"sparselora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparselora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
