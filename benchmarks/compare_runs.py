"""Held-out loss of two or more runs against step and against training wall-clock time.

Reads each run's trainer_state.json / summary.json (eval records carry `wall_seconds`; the
time spent evaluating is subtracted so the time axis is training time only), writes a PNG
and prints a markdown table.

    python benchmarks/compare_runs.py runs/quality/lora runs/quality/sparselora --out docs/quality.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def eval_curve(run: Path) -> list[dict]:
    """[{step, eval_loss, train_seconds}] from the run's final trainer state."""
    states = sorted(
        run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    state_file = run / "trainer_state.json"
    history = json.loads((state_file if state_file.exists() else states[-1]).read_text())[
        "log_history"
    ]
    points, eval_seconds = [], 0.0
    for record in history:
        if "eval_loss" in record:
            points.append(
                {"step": record["step"], "eval_loss": record["eval_loss"],
                 "train_seconds": record["wall_seconds"] - eval_seconds}
            )  # fmt: skip
            eval_seconds += record.get("eval_runtime", 0.0)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="docs/quality.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run in map(Path, args.runs):
        method = json.loads((run / "summary.json").read_text())["method"]
        curves[method] = eval_curve(run)
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for method, points in curves.items():
        by_step.plot(
            [p["step"] for p in points], [p["eval_loss"] for p in points], "o-", label=method
        )
        by_time.plot(
            [p["train_seconds"] for p in points],
            [p["eval_loss"] for p in points],
            "o-",
            label=method,
        )
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock seconds")
    for axis in (by_step, by_time):
        axis.set_ylabel("held-out loss")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    methods = list(curves)
    print("| step | " + " | ".join(f"{m} loss | {m} train s" for m in methods) + " |")
    print("|---|" + "---|---|" * len(methods))
    for i, point in enumerate(curves[methods[0]]):
        cells = []
        for m in methods:
            p = curves[m][i] if i < len(curves[m]) else None
            cells += [f"{p['eval_loss']:.4f}", f"{p['train_seconds']:.0f}"] if p else ["", ""]
        print(f"| {point['step']} | " + " | ".join(cells) + " |")
    base = curves[methods[0]]
    for method in methods[1:]:
        print(f"\n{method} against {methods[0]}: same step, and {methods[0]} interpolated at the "
              "same training time (linear between its evaluations)")  # fmt: skip
        print(f"| step | {method} loss | {methods[0]} loss, same step | ratio | train s | "
              f"{methods[0]} loss, same time | ratio |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for point, same_step in zip(curves[method], base, strict=False):
            same_time = interpolate(base, point["train_seconds"])
            cells = [
                str(point["step"]),
                f"{point['eval_loss']:.4f}",
                f"{same_step['eval_loss']:.4f}",
                f"{point['eval_loss'] / same_step['eval_loss']:.4f}",
                f"{point['train_seconds']:.0f}",
                "-" if same_time is None else f"{same_time:.4f}",
                "-" if same_time is None else f"{point['eval_loss'] / same_time:.4f}",
            ]
            print("| " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")


def interpolate(points: list[dict], seconds: float) -> float | None:
    """The loss of a curve at `seconds` of training, linear between evaluations; None outside."""
    for a, b in zip(points, points[1:], strict=False):
        if a["train_seconds"] <= seconds <= b["train_seconds"]:
            w = (seconds - a["train_seconds"]) / (b["train_seconds"] - a["train_seconds"])
            return a["eval_loss"] + w * (b["eval_loss"] - a["eval_loss"])
    return None


if __name__ == "__main__":
    main()
