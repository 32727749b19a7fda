"""The fine-tuning sub-commands: `train`, `calibrate`, `eval`, `export`, `estimator build`,
`presets`, `env` and `demo`.

`register(subparsers)` adds them to the `sparselora` argparse tree; each handler takes the parsed
arguments, calls the recipe, prints the result and returns the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from sparselora.cli.options import add_dataclass_options, dataclass_from_args, describe_fields
from sparselora.config import ESTIMATOR_KINDS, SparseLoRAConfig, get_preset
from sparselora.perf.common import hardware_header
from sparselora.presets import PRESETS
from sparselora.recipes.calibrate import CalibrateConfig, calibrate
from sparselora.recipes.demo import DemoConfig, run_demo
from sparselora.recipes.loading import EMBEDDED_MODEL, METHODS
from sparselora.recipes.run_config import RunConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the fine-tuning sub-commands, each with `func` set to its handler."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA or SparseLoRA from a YAML config",
        description="Fine-tune with LoRA or SparseLoRA. The run config is a YAML file with\n"
        "sections model/lora/sparselora/data/training/logging; every key below can be set in\n"
        "it or overridden on the command line as section.key=value.",
        epilog=run_config_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="run config YAML (optional)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=20")
    p.add_argument("--method", choices=METHODS, help="override training.method")
    p.add_argument("--output-dir", help="override training.output_dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the output dir holds a different run: move it aside to OUTPUT_DIR.replaced-K "
        "(never deleted) and train afresh",
    )
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "calibrate",
        help="measure a preset for your model, data and shape",
        description="Measure each layer's sensitivity to FFN and attention sparsity on your\n"
        "data (paired per-example loss changes with 95% intervals), choose the preset that\n"
        "saves the most FLOPs within the loss budget (or reaches --target-speedup at the least\n"
        "loss), measure the combination and repair it until it fits. The model, data, LoRA and\n"
        "estimator settings and the batch come from the run config, as for `train`; the preset\n"
        "written is used with `sparselora train ... sparselora.preset=OUT`. See docs/CALIBRATE.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="run config YAML, as for train (optional)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.max_length=320")
    p.add_argument("--model", help="override model.name")
    p.add_argument("--data", help="override data.train")
    add_dataclass_options(p, CalibrateConfig)
    p.set_defaults(func=_calibrate)

    p = subparsers.add_parser(
        "eval",
        help="held-out loss and accuracy of a trained run (dense)",
        description="Held-out loss and generation accuracy of a trained run (dense). Each "
        "evaluation writes its per-example predictions (prompt, generation, extracted answer, "
        "gold, correct) to a new file RUN_DIR/predictions/TASK-DATA[-N].jsonl, appends its "
        "result to RUN_DIR/eval_history.jsonl and writes it to RUN_DIR/eval.json (the latest "
        "evaluation). Gold answers that do not fit the task's answer rule are refused before "
        "the model loads.",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--data",
        help="held-out data: gsm8k:eval or an LLM-Adapters .json / .jsonl file with an "
        "'answer' per example (default: the run's data.eval)",
    )
    p.add_argument(
        "--task",
        help="answer rule: gsm8k, svamp, mawps, AddSub, MultiArith, SingleEq (last number), "
        "aqua (letter A-E), boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, obqa, "
        "humaneval (default: the run's data.task)",
    )
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute the held-out loss of each example's response as the file writes it "
        "(in LLM-Adapters' test files 'output' is a model-written answer, not a reference; "
        "eval.json's heldout_loss_note says what was scored)",
    )
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="--task humaneval only: run the model-written code on this machine (in a child "
        "process with a time limit, which is no sandbox: use a container); same as "
        "SPARSELORA_ALLOW_CODE_EVAL=1",
    )
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "export",
        help="merge the adapter into the base model",
        description="Merge the run's adapter into its base model and save it with "
        "save_pretrained. The output must be a new or empty folder outside the run folder (or "
        "RUN_DIR/merged); --overwrite replaces a previous export (a folder holding "
        "sparselora_export.json) and nothing else.",
    )
    p.add_argument("run_dir")
    p.add_argument("--merged", action="store_true", help="write a merged model (required)")
    p.add_argument("--output", help="a new folder (default: RUN_DIR/merged)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export at --output (never any other folder)",
    )
    p.set_defaults(func=_export)

    p = subparsers.add_parser("estimator", help="estimator files")
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="build the estimator for a model and sparsity config")
    b.add_argument("--model", default=EMBEDDED_MODEL)
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="SparseLoRA config YAML/JSON")
    what.add_argument("--preset", help="preset name instead of --config")
    b.add_argument("--kind", choices=ESTIMATOR_KINDS)
    b.add_argument("--rank", type=int)
    b.add_argument("--data", default="gsm8k:train", help="calibration data for whitened_svd")
    b.add_argument("--output", help="file (default: the estimator cache)")
    b.set_defaults(func=_estimator)

    p = subparsers.add_parser("presets", help="list presets or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_presets)

    p = subparsers.add_parser("env", help="machine and versions, for bug reports")
    p.set_defaults(func=_env)

    p = subparsers.add_parser(
        "demo",
        help="the main job: LoRA vs SparseLoRA on the embedded SmolLM2 and GSM8K",
        description="Trains LoRA and SparseLoRA with the same seed, data and steps, each in its "
        "own process, the two taking turns by blocks of --block steps so that both see the same "
        "machine conditions; evaluates both adapters and prints a side-by-side table headed by "
        "the paired median step time ratio of the interleaved blocks.",
    )
    add_dataclass_options(p, DemoConfig)
    p.set_defaults(func=_demo)


def run_config_fields() -> str:
    """Every run-config key with its type, default and help, generated from the dataclasses."""
    parts = ["run config keys (section.key):"]
    for f in dataclasses.fields(RunConfig):
        if f.name == "sparselora":
            parts.append(
                "\nsparselora: a preset ({'preset': NAME}) plus any SparseLoRAConfig field:\n"
                + describe_fields(SparseLoRAConfig, "sparselora")
            )
        else:
            parts.append("\n" + describe_fields(type(f.default_factory()), f.name))
    return "\n".join(parts)


def _run_config(args: argparse.Namespace, extra: dict[str, str | None]) -> RunConfig:
    """The run config from the optional file, the key=value overrides, and `extra` overrides
    ({'training.method': args.method, ...}; None values are left out)."""
    overrides = list(args.overrides)
    config_file = args.config
    if config_file is not None and "=" in config_file and not Path(config_file).exists():
        overrides.insert(0, config_file)  # no config file, only overrides
        config_file = None
    overrides += [f"{key}={value}" for key, value in extra.items() if value]
    return RunConfig.load(config_file, overrides)


def _train(args: argparse.Namespace) -> int:
    from sparselora.recipes.train import train

    config = _run_config(
        args, {"training.method": args.method, "training.output_dir": args.output_dir}
    )
    summary = train(config, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "train_loss_curve"}, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    run = _run_config(args, {"model.name": args.model, "data.train": args.data})
    result = calibrate(run, dataclass_from_args(CalibrateConfig, args), progress=True)
    chosen = result.config
    print(f"preset written to {result.paths['preset']}")
    print(f"  ffn_sparsity  {json.dumps(chosen.ffn_sparsity)}")
    print(f"  attn_sparsity {json.dumps(chosen.attn_sparsity)}")
    if result.search.fits:
        print(f"  held-out loss change {result.search.rounds[-1].change}")
    else:
        print("  no combination fit: the preset has no channel sparsity (see the report)")
    print(f"  predicted speedup over LoRA {result.speedup:.3f}x at batch "
          f"{result.shape['batch']} x {result.shape['seq_len']} tokens "
          f"({result.shape['answer_len']} labelled)")  # fmt: skip
    print(f"  {len(result.search.rounds)} round(s), {result.seconds / 60:.1f} min")
    print(f"report: {result.paths['report']}; plot: {result.paths['frontier']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sparselora.recipes.commands import evaluate_run

    result = evaluate_run(
        Path(args.run_dir),
        data=args.data,
        task=args.task,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        allow_code_execution=args.allow_code_execution,
        loss=args.loss,
    )
    print(json.dumps(result, indent=2))
    if result["predictions"]:
        print(f"predictions written to {result['predictions']}")
    print(
        f"result written to {Path(args.run_dir) / 'eval.json'} (and appended to eval_history.jsonl)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from sparselora.recipes.commands import export_merged

    if not args.merged:
        raise ValueError("export writes a merged model; pass --merged")
    output = Path(args.output) if args.output else None
    path = export_merged(Path(args.run_dir), output, overwrite=args.overwrite)
    print(f"merged model written to {path}")
    return 0


def _estimator(args: argparse.Namespace) -> int:
    from sparselora.recipes.commands import build_estimator_file

    path = build_estimator_file(
        args.model, args.config, args.preset, args.kind, args.rank, args.output, args.data
    )
    print(f"estimator written to {path}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    if args.action == "list" or args.name is None:
        width = max(len(n) for n in PRESETS)
        for name, preset in PRESETS.items():
            print(f"{name:<{width}}  {preset.description}  ({preset.model})")
        return 0
    print(json.dumps(get_preset(args.name).to_dict(), indent=2))
    return 0


def _env(args: argparse.Namespace) -> int:
    for key, value in hardware_header().items():
        print(f"{key:13s} {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    print("\n" + run_demo(dataclass_from_args(DemoConfig, args), progress=True))
    root = Path(args.out)
    print(f"\nloss curves: {root / 'loss.png'}; runs: {root}/lora, {root}/sparselora")
    print(f"training output: {root}/train-lora.log, {root}/train-sparselora.log")
    return 0
