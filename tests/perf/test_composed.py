"""The composed benchmark: part rows and the composed step against hand-computed values, a whole
run (with validation) on a tiny random LLaMA shape under a fake clock, the output files, the
defaults and clear errors."""

from __future__ import annotations

import contextlib
import csv
import json

import pytest
import torch
import yaml
from conftest import tiny_llama

from sparselora.config import ConfigError
from sparselora.engine.shapes import PAPER_MODELS
from sparselora.perf import common
from sparselora.perf.bench import BenchRow, MethodResult
from sparselora.perf.common import BenchShape
from sparselora.perf.composed import (
    ComposedConfig,
    compose,
    measure_parts,
    part_row,
    run_composed,
)
from sparselora.perf.parts import LayerKind, Part
from sparselora.perf.report import write_composed

SPARSE = {"ffn_sparsity": {"2-4": 0.75}, "attn_sparsity": {"3-4": 0.5}, "estimator_rank": 4}
TICK = 0.5  # seconds per call of the fake clock (exact in binary)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=6).config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sparse_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "sparse.yaml"
    path.write_text(yaml.safe_dump(SPARSE))
    return path


class FakeClock:
    """Advances by TICK on every call, so every timed region lasts exactly TICK."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += TICK
        return self.now


@pytest.fixture(scope="module")
def composed_results(tiny_dir, sparse_yaml):
    config = ComposedConfig(
        model=str(tiny_dir), sparselora=str(sparse_yaml), shapes=["32,8"], batch_size=2,
        warmup_steps=1, steps=3, lora_rank=4, device="cpu", dtype="float32", threads=1,
        validate=True,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "perf_counter", FakeClock())
        return run_composed(config)


def part(name: str, count: int, kind: LayerKind | None = None, layers=()) -> Part:
    return Part(name, name, count, lambda: None, lambda: None, kind, list(layers))


def test_part_row_by_hand():
    kind = LayerKind(0.75, 0.5, False)
    row = part_row(
        "math",
        part("layer", 3, kind, [3, 4, 7]),
        {"lora": [0.4, 0.2, 0.3], "sparselora": [0.1, 0.3, 0.2]},
        estimator=[0.02, 0.01, 0.05],
    )
    assert (row.lora.median_s, row.lora.min_s, row.lora.max_s) == (0.3, 0.2, 0.4)
    assert (row.sparselora.median_s, row.sparselora.min_s, row.sparselora.max_s) == (0.2, 0.1, 0.3)
    assert row.lora.total_s == pytest.approx(0.9) and row.sparselora.total_s == pytest.approx(0.6)
    assert row.ratio == pytest.approx(1.5)
    assert row.sparselora_estimator_s == 0.02
    assert row.lora.times == [0.4, 0.2, 0.3]
    assert (row.layers, row.count, row.ffn_sparsity, row.attn_sparsity) == ("3-4,7", 3, 0.75, 0.5)
    assert row.last_layer is False
    head = part_row("math", part("lm_head", 1), {"lora": [2.0], "sparselora": [0.5]}, [0.0])
    assert (head.layers, head.ffn_sparsity, head.last_layer) == ("", None, None)


def test_composition_by_hand():
    def row(count, lora, sparse, estimator=0.0):
        return part_row(
            "math", part("layer", count), {"lora": [lora], "sparselora": [sparse]}, [estimator]
        )

    parts = [
        row(1, 0.001, 0.001),  # inputs
        row(3, 1.0, 1.0),  # dense layers
        row(14, 1.0, 0.5, 0.01),  # FFN-only layers
        row(14, 1.0, 0.4, 0.02),  # FFN + attention layers
        row(1, 1.0, 0.8),  # last layer
        row(1, 2.0, 0.5),  # LM head + loss
        row(1, 0.3, 0.3),  # optimizer
    ]
    lora = 34.301  # 0.001 + 3 + 14 + 14 + 1 + 2 + 0.3
    sparse = 17.201  # 0.001 + 3 + 7 + 5.6 + 0.8 + 0.5 + 0.3
    shape = BenchShape("math", 512, 128)
    flops = {"lora": 3e12, "sparselora": 1.5e12}
    composed = compose(shape, 1, parts, flops, model="llama3-8b", preset="p")
    assert composed.lora.step_s == pytest.approx(lora)
    assert composed.sparselora.step_s == pytest.approx(sparse)
    assert composed.speedup == pytest.approx(lora / sparse)
    assert composed.predicted_speedup == 2.0
    assert composed.fraction_of_predicted == pytest.approx(lora / sparse / 2.0)
    assert composed.estimator_s == pytest.approx(0.42)  # 14 x 0.01 + 14 x 0.02
    assert composed.estimator_share == pytest.approx(0.42 / sparse)
    assert composed.tokens == 512
    assert composed.lora.tokens_per_s == pytest.approx(512 / lora)
    assert composed.sparselora.tokens_per_s == pytest.approx(512 / sparse)
    assert (composed.lora.tflops, composed.sparselora.tflops) == (3.0, 1.5)
    assert composed.measured_lora_step_s is None and composed.lora_composed_over_measured is None

    def measured(median_s: float) -> MethodResult:
        return MethodResult(median_s, median_s, median_s, 0, 0, None, 0, 0, [median_s], [0])

    whole = BenchRow(
        "math", 512, 128, "none", 1, 512, 0.0, measured(30.0), measured(20.0), 1.5, 1.5, 2.0,
        0.75, 1.5, 0.0, 0.0, 0.0, None, None, "llama3-8b", "p",
    )  # fmt: skip
    validated = compose(shape, 1, parts, flops, whole)
    assert (validated.measured_lora_step_s, validated.measured_sparselora_step_s) == (30.0, 20.0)
    assert validated.measured_speedup == 1.5
    assert validated.lora_composed_over_measured == pytest.approx(34.301 / 30.0)
    assert validated.sparselora_composed_over_measured == pytest.approx(17.201 / 20.0)


def test_composed_step_is_the_parts_under_a_fake_clock(composed_results):
    """Every timed run lasts one tick, so each part's median is one tick for both methods and
    the composed step is one tick per layer plus inputs, head and optimizer: 6 + 3 = 9 ticks."""
    (row,) = composed_results.rows
    parts = composed_results.parts
    assert [(p.part, p.count) for p in parts] == [
        ("inputs", 1),
        ("layer", 2),
        ("layer", 1),
        ("layer", 2),
        ("layer", 1),
        ("lm_head", 1),
        ("optimizer", 1),
    ]
    for p in parts:
        assert p.lora.times == p.sparselora.times == [TICK] * 3  # the timed repeats only
        assert (p.lora.total_s, p.ratio) == (p.count * TICK, 1.0)
    assert row.lora.step_s == row.sparselora.step_s == 9 * TICK
    assert row.speedup == 1.0 and row.tokens == 64
    assert row.lora.tokens_per_s == 64 / (9 * TICK)
    assert row.predicted_speedup > 1.0
    assert row.lora.tflops > row.sparselora.tflops


def test_validation_compares_with_the_whole_model_step(composed_results):
    """The whole-model steps ran under the same clock: one tick each, so composed / measured is
    the 9 ticks of the composed step over 1."""
    (row,) = composed_results.rows
    assert row.measured_lora_step_s == row.measured_sparselora_step_s == TICK
    assert row.measured_speedup == 1.0
    assert row.lora_composed_over_measured == row.sparselora_composed_over_measured == 9.0


def test_writes_json_csv_and_markdown(composed_results, tmp_path):
    paths = write_composed(composed_results, tmp_path)
    results = json.loads(paths["json"].read_text())
    header, rows, parts = results["header"], results["rows"], results["parts"]
    assert header["device"] == "cpu" and header["threads"] == 1 and header["dtype"] == "float32"
    assert header["model_shape"]["num_layers"] == 6
    assert [k["layers"] for k in header["layer_kinds"]] == ["0-1", "2", "3-4", "5"]
    assert header["sparselora_config"]["ffn_sparsity"] == {"2-4": 0.75}
    assert header["composed_config"]["validate"] is True
    assert header["lora_parameters"] == 6 * 1792
    assert [p["part"] for p in parts] == ["inputs"] + ["layer"] * 4 + ["lm_head", "optimizer"]
    assert [p["layers"] for p in parts if p["part"] == "layer"] == ["0-1", "2", "3-4", "5"]
    assert rows[0]["lora_step_s"] == 9 * TICK and parts[1]["lora_total_s"] == 2 * TICK

    with paths["csv"].open() as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["lora_composed_over_measured"]) == 9.0
    with paths["parts_csv"].open() as f:
        part_rows = list(csv.DictReader(f))
    assert [r["label"] for r in part_rows] == [p["label"] for p in parts]
    assert "lora_times" not in part_rows[0]  # lists stay in the JSON

    markdown = paths["markdown"].read_text()
    assert "| 32,8 (32, 8) | 2 | 4.500 | 4.500 | 1.00x |" in markdown
    assert "| layer: FFN 0.75 + attn 0.5 | 3-4 | 2 | 500.0 [500.0-500.0] |" in markdown
    assert "| 0.500 | 0.500 | 1.00x | 9.00 | 9.00 |" in markdown


def test_defaults_are_the_llama3_8b_math_table():
    config = ComposedConfig()
    assert (config.model, config.sparselora, config.shapes, config.estimator) == (
        "llama3-8b",
        "llama3-8b-math10k",
        ["math"],
        "svd",
    )
    assert (config.batch_size, config.warmup_steps, config.steps) == (1, 1, 5)
    assert config.model_shape() == PAPER_MODELS["meta-llama/Meta-Llama-3-8B"]
    assert ComposedConfig(model="smollm2-135m-instruct").model_shape().hidden == 576


def test_validation_benchmarks_the_same_model_and_settings():
    config = ComposedConfig(model="smollm2-135m", shapes=["256,64"], batch_size=3, seed=4)
    whole = config.bench_config()
    assert (whole.model, whole.sparselora, whole.estimator) == (
        "smollm2-135m",
        "llama3-8b-math10k",
        "svd",
    )
    assert (whole.shapes, whole.batch_size, whole.seed, whole.steps) == (["256,64"], 3, 4, 5)
    assert whole.random_weights is True and whole.padding == ["none"]


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="model = 'no-such-model'.*llama3-8b"):
        ComposedConfig(model="no-such-model")
    with pytest.raises(ConfigError, match="validate must be true or false"):
        ComposedConfig(validate="yes")
    with pytest.raises(ConfigError, match="steps"):
        ComposedConfig(steps=0)
    with pytest.raises(ConfigError, match="shape"):
        ComposedConfig(shapes=["huge"])
    with pytest.raises(ConfigError, match=r"estimator = 'pca' is not allowed"):
        ComposedConfig(estimator="pca")


class RecordingHandle:
    """Stands in for the SparseLoRA handle: `dense()` marks the runs inside it as LoRA's."""

    def __init__(self) -> None:
        self.method = "sparselora"
        self.stats = self

    def window(self):
        return {"estimator_seconds": 0.0}

    @contextlib.contextmanager
    def dense(self):
        self.method = "lora"
        try:
            yield
        finally:
            self.method = "sparselora"


def test_measure_parts_runs_every_part_in_each_pairs_order():
    handle, calls = RecordingHandle(), []
    parts = [
        Part(name, name, 1, lambda name=name: calls.append((name, handle.method)), lambda: None)
        for name in ("x", "y")
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "perf_counter", FakeClock())
        rows = measure_parts(parts, handle, torch.device("cpu"), warmup=1, steps=2, shape="s")
    A, B = "lora", "sparselora"
    assert calls == [
        ("x", A), ("x", B), ("y", A), ("y", B),  # warm-up pair
        ("x", B), ("x", A), ("y", B), ("y", A),
        ("x", A), ("x", B), ("y", A), ("y", B),
    ]  # fmt: skip
    assert [len(row.lora.times) for row in rows] == [2, 2]
