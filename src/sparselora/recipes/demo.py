"""The main job (`make demo`): LoRA vs SparseLoRA on the embedded SmolLM2-135M and GSM8K.

Both runs use the same seed, data, steps and LoRA settings; each trains in its own process so
its peak memory is its own. Then both adapters are evaluated (dense) on the same held-out
problems and a side-by-side table is printed and written to RUN_ROOT/comparison.md.

    python -m sparselora.recipes.demo --steps 24 --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sparselora.recipes.commands import evaluate_run
from sparselora.recipes.train import plot_losses


def train_run(method: str, root: Path, args: argparse.Namespace) -> dict:
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
    command = [sys.executable, "-m", "sparselora.cli.app", "train", *overrides]
    print(f"\n== training {method}: {' '.join(command[3:])}", flush=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run root folder")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--eval-examples", type=int, default=48, help="held-out loss examples")
    parser.add_argument("--accuracy-examples", type=int, default=16, help="generation examples")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    root = Path(args.out)
    start = time.perf_counter()
    rows = {method: train_run(method, root, args) for method in ("lora", "sparselora")}
    for method, row in rows.items():
        print(f"\n== evaluating {method} on {args.accuracy_examples} held-out problems", flush=True)
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
    (root / "comparison.md").write_text(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table)
    print(f"\nloss curves: {root / 'loss.png'}; runs: {root}/lora, {root}/sparselora")
    return 0


if __name__ == "__main__":
    sys.exit(main())
