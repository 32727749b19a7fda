"""Held-out loss of two or more runs against step and against training wall-clock time.

Reads each run's trainer_state.json / summary.json (eval records carry `wall_seconds`; the
time spent evaluating is subtracted so the time axis is training time only), writes a PNG
and prints markdown tables: every run's curve, then each later run against the first one at
the same step (matched by step number) and at the same training time (the first run's curve
interpolated linearly between its evaluations).

    python benchmarks/compare_runs.py runs/quality/lora runs/quality/sparselora --out docs/quality.png

Runs are labelled by their method; when two runs share a method, by method and folder name
(or give `--labels`).
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
    if not state_file.exists() and not states:
        raise FileNotFoundError(f"{run}: no trainer_state.json (is it a `sparselora train` run?)")
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


def interpolate(points: list[dict], seconds: float) -> float | None:
    """The loss of a curve at `seconds` of training, linear between evaluations; None outside."""
    for a, b in zip(points, points[1:], strict=False):
        if a["train_seconds"] <= seconds <= b["train_seconds"]:
            w = (seconds - a["train_seconds"]) / (b["train_seconds"] - a["train_seconds"])
            return a["eval_loss"] + w * (b["eval_loss"] - a["eval_loss"])
    return None


def run_labels(runs: list[Path], labels: list[str] | None = None) -> list[str]:
    """Each run's method, or "method (folder)" where two runs share one."""
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"--labels: {len(labels)} labels for {len(runs)} runs")
        return labels
    methods = [json.loads((run / "summary.json").read_text())["method"] for run in runs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # runs/a/sparselora and runs/b/sparselora
        names = [f"{run.parent.name}/{run.name}" for run in runs]
    return [
        f"{method} ({name})" if methods.count(method) > 1 else method
        for method, name in zip(methods, names, strict=True)
    ]


def against(base: list[dict], other: list[dict]) -> list[dict]:
    """`other`'s evaluations with `base`'s loss at the same step and at the same training time.

    Ratios are other / base (below 1: `other` is lower); None where `base` has no evaluation at
    that step or its curve does not span that time.
    """
    base_by_step = {p["step"]: p["eval_loss"] for p in base}
    rows = []
    for point in other:
        same_step = base_by_step.get(point["step"])
        same_time = interpolate(base, point["train_seconds"])
        rows.append(
            {
                **point,
                "same_step": same_step,
                "step_ratio": None if same_step is None else point["eval_loss"] / same_step,
                "same_time": same_time,
                "time_ratio": None if same_time is None else point["eval_loss"] / same_time,
            }
        )
    return rows


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default="docs/quality.png")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: method)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = run_labels(args.runs, args.labels)
    curves = {label: eval_curve(run) for label, run in zip(labels, args.runs, strict=True)}
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in curves.items():
        losses = [p["eval_loss"] for p in points]
        by_step.plot([p["step"] for p in points], losses, "o-", label=label)
        by_time.plot([p["train_seconds"] for p in points], losses, "o-", label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock seconds")
    for axis in (by_step, by_time):
        axis.set_ylabel("held-out loss")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)

    steps = sorted({p["step"] for points in curves.values() for p in points})
    print("| step | " + " | ".join(f"{m} loss | {m} train s" for m in curves) + " |")
    print("|---|" + "---|---|" * len(curves))
    for step in steps:
        cells = []
        for points in curves.values():
            p = next((p for p in points if p["step"] == step), None)
            cells += [f"{p['eval_loss']:.4f}", f"{p['train_seconds']:.0f}"] if p else ["", ""]
        print(f"| {step} | " + " | ".join(cells) + " |")
    base_label, *others = curves
    for label in others:
        print(f"\n{label} against {base_label}: same step, and {base_label} interpolated at the "
              "same training time (linear between its evaluations)")  # fmt: skip
        print(f"| step | {label} loss | {base_label} loss, same step | ratio | train s | "
              f"{base_label} loss, same time | ratio |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for row in against(curves[base_label], curves[label]):
            cells = [
                str(row["step"]),
                _cell(row["eval_loss"]),
                _cell(row["same_step"]),
                _cell(row["step_ratio"]),
                f"{row['train_seconds']:.0f}",
                _cell(row["same_time"]),
                _cell(row["time_ratio"]),
            ]
            print("| " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
