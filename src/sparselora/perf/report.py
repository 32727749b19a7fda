"""Report writers: markdown tables, CSV, JSON and a PNG for `bench`, `composed` and the FLOPs
table of `sparselora.engine.flops`.

A result row is a dataclass; its JSON/CSV record (`row_record`) is flat: each per-method
dataclass field (`lora`, `sparselora`) is spread into `{method}_{field}` columns, so
`BenchRow.lora.median_s` is the column `lora_median_s`, as in the files under docs/perf/.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparselora.engine.flops import COMPONENT_TITLES, COMPONENTS, TERA
from sparselora.perf.bench import BenchResults, BenchRow
from sparselora.perf.common import Timing
from sparselora.perf.composed import ComposedResults


def row_record(row: Any) -> dict[str, Any]:
    """A result row as one flat record: fields in order, nested dataclasses spread into
    `{field}_{nested field}` columns."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        if dataclasses.is_dataclass(value):
            record.update({f"{f.name}_{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            record[f.name] = value
    return record


def scalar_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns of `records` whose values are not lists or dicts (what a CSV holds)."""
    columns: list[str] = []
    for record in records:
        for key, value in record.items():
            if not isinstance(value, (list, dict)) and key not in columns:
                columns.append(key)
    return columns


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar_columns(records), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ms(timing: Timing) -> str:
    """Median ms [min-max]."""
    return f"{1e3 * timing.median_s:.1f} [{1e3 * timing.min_s:.1f}-{1e3 * timing.max_s:.1f}]"


def _title(header: Mapping[str, Any]) -> list[str]:
    machine = header["gpu"] or header["cpu"]
    return [
        f"{Path(header['model']).name} · {Path(header['preset']).name}",
        f"{machine} · {header['dtype']}, {header['threads']} threads",
    ]


# -- bench ---------------------------------------------------------------------------------


def bench_markdown(rows: Sequence[BenchRow]) -> str:
    """Per (shape, padding): median step ms [min-max] of each method, measured and predicted
    speedup, estimator share, tokens/s and memory (LoRA -> SparseLoRA)."""
    header = [
        "shape (L, out)",
        "padding",
        "LoRA ms",
        "SparseLoRA ms",
        "speedup",
        "paired",
        "predicted",
        "of predicted",
        "end-to-end",
        "estimator",
        "tokens/s",
        "saved act. MiB",
        "peak MiB",
    ]

    def pair(row: BenchRow, key: str, spec: str) -> str:
        return f"{_fmt(getattr(row.lora, key), spec)} → {_fmt(getattr(row.sparselora, key), spec)}"

    cells = [
        [
            f"{row.shape} ({row.seq_len}, {row.out_tokens})",
            f"{row.padding} ({100 * row.pad_fraction:.0f}% pad)",
            _ms(row.lora),
            _ms(row.sparselora),
            f"{row.speedup:.2f}x",
            f"{row.paired_speedup:.2f}x",
            f"{row.predicted_speedup:.2f}x",
            f"{100 * row.fraction_of_predicted:.0f}%",
            f"{row.end_to_end_speedup:.2f}x",
            f"{100 * row.estimator_share:.1f}%",
            pair(row, "tokens_per_s", ".0f"),
            pair(row, "saved_mib", ".1f"),
            pair(row, "peak_mib", ".0f"),
        ]
        for row in rows
    ]
    return "\n".join(_table(header, cells))


def plot_bench(rows: Sequence[BenchRow], path: Path, title: str = "") -> None:
    """Median step time per method (min-max whiskers) and measured vs predicted speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.shape}\npad={r.padding}" for r in rows]
    x = list(range(len(rows)))
    width = 0.38
    fig, (times, speedups) = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(rows) + 4), 4))
    for offset, method, name in (
        (-width / 2, "lora", "LoRA"),
        (width / 2, "sparselora", "SparseLoRA"),
    ):
        timings = [getattr(r, method) for r in rows]
        medians = [1e3 * t.median_s for t in timings]
        low = [m - 1e3 * t.min_s for m, t in zip(medians, timings, strict=True)]
        high = [1e3 * t.max_s - m for m, t in zip(medians, timings, strict=True)]
        times.bar([i + offset for i in x], medians, width, yerr=[low, high], capsize=3, label=name)
    times.set_ylabel("step time (ms), median [min-max]")
    speedups.bar([i - width / 2 for i in x], [r.speedup for r in rows], width, label="measured")
    speedups.bar(
        [i + width / 2 for i in x],
        [r.predicted_speedup for r in rows],
        width,
        label="FLOPs-predicted",
    )
    speedups.axhline(1.0, color="grey", linewidth=0.8)
    speedups.set_ylabel("speedup over LoRA")
    for axis in (times, speedups):
        axis.set_xticks(x, labels)
        axis.legend()
        axis.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_bench(results: BenchResults, output_dir: str | Path) -> dict[str, Path]:
    """bench.json (header + rows), bench.csv (scalar columns), bench.md and bench.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "bench.json",
        "csv": out / "bench.csv",
        "markdown": out / "bench.md",
        "plot": out / "bench.png",
    }
    records = [row_record(row) for row in results.rows]
    paths["json"].write_text(
        json.dumps({"header": results.header, "rows": records}, indent=2) + "\n"
    )
    write_csv(paths["csv"], records)
    title = _title(results.header)
    table = bench_markdown(results.rows)
    paths["markdown"].write_text(f"{' · '.join(title)} · {results.header['date']}\n\n{table}\n")
    plot_bench(results.rows, paths["plot"], "\n".join(title))
    return paths


# -- composed ------------------------------------------------------------------------------


def composed_markdown(results: ComposedResults) -> str:
    """Composed step per shape (with the whole-model check when validated), then the parts of
    each shape: median ms [min-max] per method, LoRA / SparseLoRA ratio, totals in the model."""
    rows = results.rows
    validated = any(row.measured_lora_step_s is not None for row in rows)
    header = ["shape (L, out)", "batch", "LoRA step s", "SparseLoRA step s", "speedup"]
    header += ["predicted", "of predicted", "estimator", "tokens/s"]
    if validated:
        header += ["measured LoRA s", "measured SparseLoRA s", "measured speedup"]
        header += ["composed/measured LoRA", "composed/measured SparseLoRA"]
    cells = []
    for row in rows:
        cells.append(
            [
                f"{row.shape} ({row.seq_len}, {row.out_tokens})",
                str(row.batch_size),
                f"{row.lora.step_s:.3f}",
                f"{row.sparselora.step_s:.3f}",
                f"{row.speedup:.2f}x",
                f"{row.predicted_speedup:.2f}x",
                f"{100 * row.fraction_of_predicted:.0f}%",
                f"{100 * row.estimator_share:.1f}%",
                f"{row.lora.tokens_per_s:.0f} → {row.sparselora.tokens_per_s:.0f}",
            ]
        )
        if validated:
            cells[-1] += [
                f"{row.measured_lora_step_s:.3f}",
                f"{row.measured_sparselora_step_s:.3f}",
                f"{row.measured_speedup:.2f}x",
                f"{row.lora_composed_over_measured:.2f}",
                f"{row.sparselora_composed_over_measured:.2f}",
            ]
    lines = _table(header, cells)
    part_header = ["part", "layers", "count", "LoRA ms", "SparseLoRA ms", "ratio"]
    part_header += ["LoRA s x count", "SparseLoRA s x count"]
    for row in rows:
        lines += ["", f"Parts of {row.shape} ({row.seq_len}, {row.out_tokens}):", ""]
        part_cells = [
            [
                part.label,
                part.layers or "-",
                str(part.count),
                _ms(part.lora),
                _ms(part.sparselora),
                f"{part.ratio:.2f}x",
                f"{part.lora.total_s:.3f}",
                f"{part.sparselora.total_s:.3f}",
            ]
            for part in results.parts
            if part.shape == row.shape
        ]
        lines += _table(part_header, part_cells)
    return "\n".join(lines)


def write_composed(results: ComposedResults, output_dir: str | Path) -> dict[str, Path]:
    """composed.json (everything), composed.csv (one row per shape), composed_parts.csv (one
    row per shape and part, without the lists of times) and composed.md."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "composed.json",
        "csv": out / "composed.csv",
        "parts_csv": out / "composed_parts.csv",
        "markdown": out / "composed.md",
    }
    rows = [row_record(row) for row in results.rows]
    parts = [row_record(part) for part in results.parts]
    document = {"header": results.header, "rows": rows, "parts": parts}
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    write_csv(paths["csv"], rows)
    write_csv(paths["parts_csv"], parts)
    title = f"Composed step · {' · '.join(_title(results.header))} · {results.header['date']}"
    paths["markdown"].write_text(f"{title}\n\n{composed_markdown(results)}\n")
    return paths


# -- FLOPs ---------------------------------------------------------------------------------


def _tflops(value: float) -> str:
    return f"{value / TERA:.3g}"


def flops_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of `engine.flops.flops_table` / `compare`: totals in TFLOPs per step, predicted
    speedup, and each component as "LoRA -> SparseLoRA" TFLOPs (one number where equal)."""
    header = ["preset", "model", "task (L, out)", "LoRA TFLOPs", "SparseLoRA TFLOPs", "speedup"]
    header += [COMPONENT_TITLES[c] for c in COMPONENTS]
    cells = []
    for row in rows:
        cells.append(
            [
                row.get("preset", "-"),
                row.get("model", "-").split("/")[-1],
                f"{row.get('task', '-')} ({row['seq_len']}, {row['out_tokens']})",
                f"{row['lora_tflops']:.2f}",
                f"{row['sparselora_tflops']:.2f}",
                f"{row['speedup']:.2f}x",
            ]
        )
        for component in COMPONENTS:
            before, after = row["lora"][component], row["sparselora"][component]
            same = before == after
            cells[-1].append(_tflops(before) if same else f"{_tflops(before)} → {_tflops(after)}")
    return "\n".join(_table(header, cells))
