"""The main job (`make demo`): LoRA vs SparseLoRA on the embedded SmolLM2-135M and GSM8K.

Both runs use the same seed, data, steps and LoRA settings; each trains in its own process so
its peak memory is its own. Then both adapters are evaluated (dense) on the same held-out
problems and a side-by-side table is printed and written to RUN_ROOT/comparison.md.

    sparselora demo --steps 24 --out runs/demo
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sparselora.config import check_int, doc
from sparselora.recipes.commands import evaluate_run
from sparselora.recipes.loading import METHODS
from sparselora.recipes.train import plot_losses

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What `sparselora demo` runs; validated on construction."""

    out: str = field(default="runs/demo", metadata=doc("Run root folder."))
    steps: int = field(default=24, metadata=doc("Optimizer steps per method."))
    batch_size: int = field(default=4, metadata=doc("Micro-batch size."))
    max_length: int = field(default=320, metadata=doc("Tokens per example after truncation."))
    eval_examples: int = field(default=48, metadata=doc("Held-out problems for the loss."))
    accuracy_examples: int = field(
        default=16, metadata=doc("Held-out problems answered by greedy generation.")
    )
    max_new_tokens: int = field(default=192, metadata=doc("Generated tokens per answer."))
    seed: int = field(default=42, metadata=doc("Seed of both runs."))

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_examples", "accuracy_examples",
                     "max_new_tokens"):  # fmt: skip
            check_int(name, getattr(self, name), minimum=1)


def train_run(method: str, root: Path, args: DemoConfig) -> dict:
    """Train one method in its own process (`sparselora train`); returns its summary.json.

    Every demo trains afresh: an earlier demo run in ROOT/METHOD is moved aside to
    ROOT/METHOD.replaced-K (`train --overwrite`), never deleted."""
    out = root / method
    overrides = [
        f"training.method={method}",
        f"training.output_dir={out}",
        f"training.max_steps={args.steps}",
        f"training.batch_size={args.batch_size}",
        "training.save_steps=0",
        "training.resume=false",
        f"training.seed={args.seed}",
        f"data.max_length={args.max_length}",
        f"data.max_eval_examples={args.eval_examples}",
        f"logging.logging_steps={max(1, args.steps // 12)}",
    ]
    command = [sys.executable, "-m", "sparselora.cli", "train", "--overwrite", *overrides]
    logger.info("training %s: sparselora %s", method, " ".join(command[3:]))
    subprocess.run(command, check=True)
    return json.loads((out / "summary.json").read_text())


def comparison_table(rows: dict[str, dict]) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| | LoRA | SparseLoRA | ratio |",
        "|---|---|---|---|",
    ]
    specs = [
        ("median step time (s)", "median_step_seconds", ".2f", "lora/sparse"),
        ("tokens / s", "tokens_per_second", ".0f", "sparse/lora"),
        ("training TFLOPs", "train_flops", ".2f", "lora/sparse"),
        ("peak training memory (MiB)", "peak_memory_mb", ".0f", "sparse/lora"),
        ("held-out loss", "eval_loss", ".4f", "sparse/lora"),
        ("held-out accuracy", "accuracy", ".3f", ""),
    ]
    lora, sparse = rows["lora"], rows["sparselora"]
    for title, key, spec, ratio in specs:
        a, b = lora.get(key), sparse.get(key)
        if key == "train_flops":
            a, b = (None if a is None else a / 1e12), (None if b is None else b / 1e12)
        if ratio and a and b:
            value = a / b if ratio == "lora/sparse" else b / a
            ratio_text = f"{value:.3f} ({ratio})"
        else:
            ratio_text = ""
        lines.append(f"| {title} | {fmt(a, spec)} | {fmt(b, spec)} | {ratio_text} |")
    return "\n".join(lines)


def run_demo(args: DemoConfig) -> str:
    """Train both methods, evaluate both adapters, write RUN_ROOT/comparison.md and loss.png.

    Returns the comparison (a header line and a markdown table).
    """
    root = Path(args.out)
    start = time.perf_counter()
    rows = {method: train_run(method, root, args) for method in METHODS}
    for method, row in rows.items():
        logger.info("evaluating %s on %d held-out problems", method, args.accuracy_examples)
        result = evaluate_run(
            root / method,
            limit=args.accuracy_examples,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.accuracy_examples,
        )
        row["accuracy"] = result.get("accuracy")
    plot_losses(list(rows.values()), root / "loss.png")
    table = comparison_table(rows)
    minutes = (time.perf_counter() - start) / 60
    header = (
        f"SmolLM2-135M-Instruct on GSM8K, {args.steps} steps x batch {args.batch_size}, "
        f"same seed and data; preset {rows['sparselora'].get('preset', 'default')}; "
        f"held-out loss on {args.eval_examples} problems, accuracy on {args.accuracy_examples}; "
        f"{minutes:.1f} min in all"
    )
    comparison = header + "\n\n" + table
    (root / "comparison.md").write_text(comparison + "\n")
    return comparison
