"""The files `sparselora calibrate` leaves beside its preset: report.md, sweep.csv, frontier.png.

`write_report` takes a finished `recipes.calibrate.Calibration` (duck-typed here, so this module
sits below the one that measures) and the options it ran with.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from sparselora.recipes.preset_choice import spec, t_quantile_975


def write_report(result: Any, run: Any, options: Any) -> dict[str, str]:
    """Write report.md, sweep.csv and frontier.png into `options.report_dir`; returns paths."""
    folder = Path(options.report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "report": str(folder / "report.md"),
        "sweep": str(folder / "sweep.csv"),
        "frontier": str(folder / "frontier.png"),
    }
    _write_sweep(result, Path(paths["sweep"]))
    _plot_frontier(result, options, Path(paths["frontier"]))
    Path(paths["report"]).write_text(_markdown(result, run, options))
    result.paths.update(paths)
    return paths


def _write_sweep(result: Any, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["block", "layer", "sparsity", "change_pct", "half_width_pct", "examples",
             "flops_saved_pct", "note"]
        )  # fmt: skip
        for o in sorted(result.options, key=lambda o: (o.block, o.layer, o.sparsity)):
            writer.writerow(
                [o.block, o.layer, o.sparsity, f"{o.change.percent:.4f}",
                 f"{o.change.half_width:.4f}", o.change.examples,
                 f"{100 * o.saved / result.base_flops:.4f}", ""]
            )  # fmt: skip
        for block, layer, sparsity, why in result.skipped:
            writer.writerow([block, layer, sparsity, "", "", 0, "", f"not measured: {why}"])


def _plot_frontier(result: Any, options: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rounds = result.search.rounds
    xs = [1.0] + [r.speedup for r in rounds]
    ys = [0.0] + [r.change.percent for r in rounds]
    errs = [0.0] + [r.change.half_width for r in rounds]
    ax.errorbar(xs[1:], ys[1:], yerr=errs[1:], fmt="o", color="tab:blue", capsize=3,
                label="combinations measured (95% interval)")  # fmt: skip
    dense_speedup = result.lora_flops / result.base_flops
    ax.plot([dense_speedup], [0.0], "s", color="gray", label="exact savings only (no sparsity)")
    for i, r in enumerate(rounds, start=1):
        ax.annotate(str(i), (r.speedup, r.change.percent), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)  # fmt: skip
    if result.search.fits:
        chosen = rounds[-1]
        ax.plot([chosen.speedup], [chosen.change.percent], "*", ms=14, color="tab:red",
                label="chosen")  # fmt: skip
    if options.budget is not None:
        ax.axhline(options.budget, ls="--", color="tab:red", lw=1, label="loss budget (±)")
        ax.axhline(-options.budget, ls="--", color="tab:red", lw=1)
    if options.target_speedup is not None:
        ax.axvline(options.target_speedup, ls="--", color="tab:red", lw=1, label="target")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("predicted training-step speedup over LoRA (analytic FLOPs)")
    ax.set_ylabel("held-out loss change before fine-tuning, %")
    ax.set_title("sparselora calibrate: candidates tried (numbered by round)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _examples_for(change: Any, half_width: float) -> int:
    """Examples for a 95% half-width of `half_width`, at the spread `change` was measured with
    (the normal quantile: the t correction is small at these sizes)."""
    spread = change.half_width * math.sqrt(change.examples) / t_quantile_975(change.examples - 1)
    return math.ceil((1.959964 * spread / half_width) ** 2)


def _cell(result: Any, block: str, layer: int, sparsity: float) -> str:
    for o in result.options:
        if (o.block, o.layer, o.sparsity) == (block, layer, sparsity):
            return f"{o.change.percent:+.2f} ± {o.change.half_width:.2f} ({o.change.examples})"
    for b, layer_, s, why in result.skipped:
        if (b, layer_, s) == (block, layer, sparsity):
            return "(top usable)" if "not clearly" in why else "(over)"
    return ""


def _markdown(result: Any, run: Any, options: Any) -> str:
    shape = result.shape
    mode = (
        f"loss budget ±{options.budget}% (the preset's measured change; every block's whole "
        f"one-layer interval)"
        if options.budget is not None
        else f"target speedup {options.target_speedup}x"
    )
    chosen = spec(result.search.chosen)
    lines = [
        "# sparselora calibrate report",
        "",
        f"- model `{run.model.name}`, data `{run.data.train}` (template {run.data.template}, "
        f"max_length {run.data.max_length}), estimator {result.config.estimator} rank "
        f"{result.config.estimator_rank}",
        f"- {mode}; held-out pool {result.examples_pool} training examples (not the "
        f"estimator's, seed {options.seed}): {options.sweep_examples} per one-layer measurement; "
        f"combinations measured on all {options.max_examples} unless their interval lies "
        f"wholly outside ±budget after {options.min_examples} or more",
        f"- dense held-out loss {result.dense_loss:.4f}; FLOPs at batch {shape['batch']} x "
        f"{shape['seq_len']} tokens ({shape['answer_len']} labelled): LoRA "
        f"{result.lora_flops / 1e12:.3f} TFLOPs per step, exact savings alone "
        f"{result.lora_flops / result.base_flops:.3f}x",
        f"- cost: {result.seconds / 60:.1f} min, {result.full_forwards:.0f} full-model forwards "
        f"of one example (dense prefix reused: {'yes' if result.reuse else 'no'})",
        "",
        "## Chosen preset",
        "",
    ]
    if result.search.fits:
        last = result.search.rounds[-1]
        lines += [
            f"`{result.paths['preset']}`: FFN `{json.dumps(chosen['ffn_sparsity'])}`, attention "
            f"`{json.dumps(chosen['attn_sparsity'])}`",
            "",
            f"Measured held-out loss change {last.change}; predicted speedup "
            f"**{last.speedup:.3f}x** over LoRA at this shape; found in "
            f"{len(result.search.rounds)} measured round(s).",
        ]
        if options.budget is not None and last.change.half_width > options.budget / 2:
            needed = _examples_for(last.change, options.budget / 2)
            lines += [
                "",
                f"The interval is wide against the budget: about {needed} held-out examples "
                f"would narrow it to ±{options.budget / 2:g}% (`--max-examples`; the cost of "
                f"each combination grows in proportion).",
            ]
    else:
        lines.append(
            "No combination fit within the rounds allowed; the preset written has no channel "
            "sparsity (exact savings only). Raise the budget or --max-rounds."
        )
    lines += ["", "## Rounds", "", "| round | FFN | attention | loss change | speedup | fits | then |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(result.search.rounds, start=1):
        s = spec(r.assignment)
        lines.append(
            f"| {i} | {json.dumps(s['ffn_sparsity'])} | {json.dumps(s['attn_sparsity'])} | "
            f"{r.change} | {r.speedup:.3f}x | {'yes' if r.fits else 'no'} | {r.action} |"
        )
    if result.validation:
        v = result.validation
        lines += ["", f"## Validation: {v['steps']} fine-tuning steps each", "",
                  "| step | LoRA | SparseLoRA | gap |", "|---|---|---|---|"]  # fmt: skip
        for step, gap in v["gap_pct"].items():
            lines.append(
                f"| {step} | {v['lora'][step]:.4f} | {v['sparselora'][step]:.4f} | {gap:+.2f}% |"
            )
    levels = [("ffn", s) for s in sorted(options.ffn_levels)] + [
        ("attn", s) for s in sorted(options.attn_levels)
    ]
    layers = sorted({o.layer for o in result.options} | {s[1] for s in result.skipped})
    lines += [
        "",
        "## One-layer sensitivity",
        "",
        "Held-out loss change in percent with only this block sparse, ± the 95% interval's "
        "half-width (examples measured). Not measured (unless --full-grid): '(top usable)', the "
        "block's highest level is not clearly over the budget, so it is the candidate; "
        "'(over)', a lower level is already clearly over the budget.",
        "",
        "| layer | " + " | ".join(f"{b} {s:g}" for b, s in levels) + " |",
        "|---" * (len(levels) + 1) + "|",
    ]
    for layer in layers:
        cells = [_cell(result, b, layer, s) for b, s in levels]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
