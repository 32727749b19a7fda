"""Report writers: rows become the flat records of the result files under docs/perf/, and the
FLOPs table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparselora.engine.flops import flops_table
from sparselora.perf.bench import BenchRow, MethodResult
from sparselora.perf.composed import ComposedRow, ComposedStep, PartRow, PartTiming
from sparselora.perf.report import flops_markdown, row_record, scalar_columns

DOCS = Path(__file__).resolve().parents[2] / "docs" / "perf"


def bench_row() -> BenchRow:
    def method(median_s):
        return MethodResult(median_s, 0.1, 0.9, 2.0, 100.0, None, 12.5, 1.5, [0.1, 0.9], [1.5])

    return BenchRow(
        "math", 512, 128, "none", 4, 2048, 0.0, method(0.5), method(0.4), 1.25, 1.3, 1.4,
        0.89, 1.2, 0.05, 0.001, 0.0025, 0.1, None, "smollm2-135m-instruct", "smollm2-135m-gsm8k",
    )  # fmt: skip


def test_a_bench_row_spreads_each_method_into_prefixed_columns():
    record = row_record(bench_row())
    assert record["lora_median_s"] == 0.5 and record["sparselora_median_s"] == 0.4
    assert record["sparselora_step_times"] == [0.1, 0.9]
    assert record["lora_peak_mib"] is None and record["sparselora_saved_mib"] == 12.5
    assert record["speedup"] == 1.25 and record["preset"] == "smollm2-135m-gsm8k"
    assert "lora" not in record and "sparselora" not in record
    assert "lora_step_times" not in scalar_columns([record])


@pytest.mark.parametrize(
    ("file", "key", "row"),
    [
        ("bench-smollm2.json", "rows", bench_row),
        (
            "composed-smollm2-validate.json",
            "rows",
            lambda: ComposedRow(
                "m",
                "p",
                "math",
                512,
                128,
                1,
                512,
                ComposedStep(1.0, 2.0, 3.0),
                ComposedStep(1.0, 2.0, 3.0),
                1.0,
                1.0,
                1.0,
                0.0,
                0.0,
            ),  # fmt: skip
        ),
        (
            "composed-8b-csr.json",
            "parts",
            lambda: PartRow(
                "math",
                "layer",
                "l",
                "0-2",
                3,
                None,
                None,
                False,
                PartTiming(1, 1, 1, 3, [1]),
                PartTiming(1, 1, 1, 3, [1]),
                1.0,
                0.0,
            ),  # fmt: skip
        ),
    ],
)
def test_records_have_the_columns_of_the_published_results(file, key, row):
    """The JSON written today reads like the files under docs/perf/ (same column names)."""
    published = json.loads((DOCS / file).read_text())[key][0]
    assert set(row_record(row())) == set(published)


def test_flops_table_markdown():
    rows = flops_table(presets=["llama3-8b-math10k", "llama3-8b-csr"])
    table = flops_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[0].startswith("| preset | model | task (L, out) | LoRA TFLOPs |")
    assert table[2].startswith(
        f"| llama3-8b-math10k | Meta-Llama-3-8B-Instruct | math (512, 128) | "
        f"{rows[0]['lora_tflops']:.2f} | {rows[0]['sparselora_tflops']:.2f} | "
        f"{rows[0]['speedup']:.2f}x |"
    )
    assert "commonsense (512, 3)" in table[3]
    # A part that differs between the methods has an arrow: the MLP, and the attention core
    # (the last layer's on read query rows only).
    core = rows[0]["lora"]["attn_core"] / 1e12, rows[0]["sparselora"]["attn_core"] / 1e12
    assert core[1] < core[0] and f"| {core[0]:.3g} → {core[1]:.3g} |" in table[2]
    mlp = rows[0]["lora"]["mlp_proj"] / 1e12, rows[0]["sparselora"]["mlp_proj"] / 1e12
    assert f"| {mlp[0]:.3g} → {mlp[1]:.3g} |" in table[2]
