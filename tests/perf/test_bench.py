"""`run_benchmark` end to end on a tiny model (output files, what each row reports, same-state
steps), the row summary against hand-computed values, and which model is loaded."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from conftest import tiny_llama

from sparselora.config import ConfigError, SparseLoRAConfig
from sparselora.engine.flops import step_flops
from sparselora.engine.shapes import ModelShape
from sparselora.perf import bench
from sparselora.perf.bench import BenchConfig, Step, bench_row, run_benchmark
from sparselora.perf.common import MIB, BenchShape
from sparselora.perf.report import bench_markdown, write_bench
from sparselora.recipes.loading import EMBEDDED_MODEL, load_model

SPARSE = {
    "ffn_sparsity": {"1-2": 0.75},
    "attn_sparsity": {"1-2": 0.5},
    "estimator_rank": 4,
    "start_step": 0.1,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sparse_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "sparse.yaml"
    path.write_text(yaml.safe_dump(SPARSE))
    return path


@pytest.fixture(scope="module")
def bench_results(tiny_dir, sparse_yaml):
    config = BenchConfig(
        model=str(tiny_dir), sparselora=str(sparse_yaml), shapes=["32,8"],
        padding=["none", "left"], batch_size=2, warmup_steps=1, steps=2, device="cpu",
        dtype="float32", learning_rate=0.05, threads=1,
    )  # fmt: skip
    return run_benchmark(config)


def step(seconds, loss, estimator=0.0, ffn_kept=None, peak=None):
    return Step(seconds, loss, estimator, ffn_kept, None, peak)


def test_row_summary_by_hand():
    steps = {
        "lora": [step(0.30, 2.0), step(0.20, 2.5), step(0.40, 3.0)],
        "sparselora": [
            step(0.10, 2.1, 0.01, 0.25, 2 * MIB),
            step(0.25, 2.2, 0.03, 0.50, 4 * MIB),
            step(0.20, 2.9, 0.02, None, 3 * MIB),
        ],
    }
    row = bench_row(
        BenchShape("8,2", 8, 2), "left", batch_size=2, real_tokens=12, steps=steps,
        saved_bytes={"lora": 3 * MIB, "sparselora": 3 * MIB // 2},
        flops={"lora": 6e12, "sparselora": 5e12}, dense_fraction=0.1, model="m", preset="p",
    )  # fmt: skip
    assert (row.lora.median_s, row.lora.min_s, row.lora.max_s) == (0.30, 0.20, 0.40)
    assert (row.sparselora.median_s, row.sparselora.min_s, row.sparselora.max_s) == (
        0.20,
        0.10,
        0.25,
    )
    assert row.lora.step_times == [0.30, 0.20, 0.40]
    assert row.sparselora.losses == [2.1, 2.2, 2.9]
    assert (row.lora.loss, row.sparselora.loss) == (2.5, 2.2)
    assert row.speedup == pytest.approx(1.5)  # 0.30 / 0.20
    assert row.paired_speedup == pytest.approx(2.0)  # median of 3.0, 0.8, 2.0
    assert row.predicted_speedup == pytest.approx(1.2)  # 6 / 5 TFLOPs
    assert row.fraction_of_predicted == pytest.approx(1.25)
    assert (row.lora.tflops, row.sparselora.tflops) == (6.0, 5.0)
    assert row.end_to_end_speedup == pytest.approx(1 / 0.7)  # 1 / (0.1 + 0.9 / 1.5)
    assert row.dense_step_fraction == 0.1
    assert row.estimator_s == 0.02 and row.estimator_share == pytest.approx(0.1)
    assert row.lora.tokens_per_s == pytest.approx(40.0)  # 12 / 0.3
    assert row.sparselora.tokens_per_s == pytest.approx(60.0)
    assert (row.lora.saved_mib, row.sparselora.saved_mib) == (3.0, 1.5)
    assert (row.lora.peak_mib, row.sparselora.peak_mib) == (None, 4.0)
    assert row.ffn_kept == pytest.approx(0.375) and row.attn_kept is None  # mean of the known
    assert (row.real_tokens, row.pad_fraction) == (12, 0.25)  # 12 of 2 x 8 tokens
    assert (row.shape, row.seq_len, row.out_tokens, row.padding) == ("8,2", 8, 2, "left")
    assert (row.model, row.preset) == ("m", "p")


def test_measured_rows(bench_results, tiny_dir, sparse_yaml):
    rows = bench_results.rows
    assert [(r.shape, r.padding) for r in rows] == [("32,8", "none"), ("32,8", "left")]
    for row in rows:
        for result in (row.lora, row.sparselora):
            assert len(result.step_times) == len(result.losses) == 2
            assert result.peak_mib is None  # no peak counter on CPU
            assert result.saved_mib > 0
        assert row.predicted_speedup > 1.0
        assert 0 < row.estimator_s < row.sparselora.median_s
        assert row.ffn_kept == pytest.approx(24 / 96)  # 75% of 96 FFN channels removed
        assert row.attn_kept == pytest.approx(0.5)
        assert row.dense_step_fraction == pytest.approx(0.1)  # start_step 0.1, end_step 1.0
        assert (row.model, row.preset) == (str(tiny_dir), str(sparse_yaml))
    none, left = rows
    assert none.pad_fraction == 0 and none.real_tokens == 2 * 32
    assert 0 < left.pad_fraction < 1 and left.real_tokens < 2 * 32
    # The unpadded row's prediction is the analytic model's at that shape, rank and config.
    shape = ModelShape.from_config(tiny_llama(layers=3).config)
    lora, sparse = (
        step_flops(shape, 32, 8, 2, lora_rank=32, config=c)["total"]
        for c in (None, SparseLoRAConfig(**SPARSE))
    )
    assert none.lora.tflops == lora / 1e12 and none.sparselora.tflops == sparse / 1e12


def test_every_step_starts_from_the_same_adapter_state(bench_results):
    """Weights are restored before each step, so repeated steps give the same loss even though
    the optimizer moves the adapters by a lot (learning rate 0.05); SparseLoRA's loss is close
    to LoRA's but not equal (it is sparse)."""
    for row in bench_results.rows:
        for result in (row.lora, row.sparselora):
            assert result.losses[0] == pytest.approx(result.losses[1], rel=1e-6, abs=0)
        assert row.sparselora.loss != row.lora.loss
        assert row.sparselora.loss == pytest.approx(row.lora.loss, rel=0.2)


def test_writes_json_csv_markdown_and_plot(bench_results, tiny_dir, tmp_path):
    paths = write_bench(bench_results, tmp_path)
    assert paths == {
        "json": tmp_path / "bench.json",
        "csv": tmp_path / "bench.csv",
        "markdown": tmp_path / "bench.md",
        "plot": tmp_path / "bench.png",
    }
    results = json.loads(paths["json"].read_text())
    header, rows = results["header"], results["rows"]
    assert header["dtype"] == "float32" and header["device"] == "cpu" and header["threads"] == 1
    assert header["sparselora_config"]["ffn_sparsity"] == {"1-2": 0.75}
    assert header["bench_config"]["steps"] == 2 and header["random_weights"] is False
    assert header["model_shape"]["num_layers"] == 3
    assert rows[1]["lora_step_times"] == bench_results.rows[1].lora.step_times
    assert rows[0]["sparselora_median_s"] == bench_results.rows[0].sparselora.median_s

    with paths["csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["padding"] for r in csv_rows] == ["none", "left"]
    assert float(csv_rows[0]["speedup"]) == pytest.approx(bench_results.rows[0].speedup)
    assert "lora_step_times" not in csv_rows[0]  # lists stay in the JSON

    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    markdown = paths["markdown"].read_text()
    assert "| 32,8 (32, 8) | none (0% pad) |" in markdown
    assert markdown.startswith(f"{tiny_dir.name} · sparse.yaml · ")
    assert " · float32, 1 threads · " in markdown.splitlines()[0]


def test_markdown_shows_na_for_missing_memory(bench_results):
    rows = bench_results.rows
    lines = bench_markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert "speedup" in lines[0] and "estimator" in lines[0]
    assert "n/a → n/a" in lines[2]  # CPU peak memory
    assert f"| {rows[0].speedup:.2f}x | {rows[0].paired_speedup:.2f}x |" in lines[2]


def test_padding_is_checked_and_deduplicated():
    assert BenchConfig(padding=["left", "none", "left"]).padding == ["left", "none"]
    with pytest.raises(ConfigError, match=r"padding = \['right'\] is not allowed"):
        BenchConfig(padding=["right"])
    with pytest.raises(ConfigError, match="random_weights must be true or false"):
        BenchConfig(random_weights="yes")


class _Loaded(Exception):
    pass


def test_run_benchmark_loads_the_named_model(monkeypatch):
    """A paper alias with random weights, the embedded model and a local directory all go to
    the one loader with the config's dtype, attention, device and seed."""
    calls = []

    def spy(name, dtype, attn_implementation, **kwargs):
        calls.append((name, dtype, attn_implementation, kwargs))
        raise _Loaded

    monkeypatch.setattr(bench, "load_model", spy)
    cpu = torch.device("cpu")
    for model, random_weights in (("llama3-8b", True), (EMBEDDED_MODEL, False), ("a/dir", False)):
        config = BenchConfig(model=model, random_weights=random_weights, device="cpu", seed=7)
        with pytest.raises(_Loaded):
            run_benchmark(config)
    assert calls == [
        (
            "llama3-8b",
            "auto",
            "sdpa",
            {"device": cpu, "random_weights": True, "seed": 7, "load_in_4bit": False},
        ),
        (
            EMBEDDED_MODEL,
            "auto",
            "sdpa",
            {"device": cpu, "random_weights": False, "seed": 7, "load_in_4bit": False},
        ),
        (
            "a/dir",
            "auto",
            "sdpa",
            {"device": cpu, "random_weights": False, "seed": 7, "load_in_4bit": False},
        ),
    ]


def test_random_weights_of_a_paper_alias_and_a_local_dir(tiny_dir):
    llama = load_model("llama3-8b", "bfloat16", device="meta", random_weights=True)  # no memory
    assert (llama.config.hidden_size, llama.config.num_hidden_layers) == (4096, 32)
    assert llama.config.vocab_size == 128256
    random_model = load_model(str(tiny_dir), "float32", random_weights=True, seed=5)
    trained = load_model(str(tiny_dir), "float32")
    random_weight = random_model.model.layers[0].mlp.up_proj.weight
    trained_weight = trained.model.layers[0].mlp.up_proj.weight
    assert random_weight.shape == trained_weight.shape == (96, 64)
    assert not torch.equal(random_weight, trained_weight)


class ScriptedRunner:
    """Stands in for `StepRunner`: records the order of the steps and gives each a scripted
    duration (a warm-up step 100 s, so a warm-up step counted as timed would show)."""

    device = torch.device("cpu")

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.calls: list[str] = []

    def step(self, method, batch):
        self.calls.append(method)
        warm = len(self.calls) <= 2 * self.warmup_steps
        seconds = 100.0 if warm else {"lora": 1.0, "sparselora": 0.5}[method] * len(self.calls)
        return Step(seconds, 1.0, 0.0, None, None, None)

    def saved_bytes(self, method, batch):
        return MIB


def test_measure_row_runs_pairs_in_order_and_times_only_the_timed_ones():
    config = BenchConfig(warmup_steps=1, steps=3, batch_size=2)
    runner = ScriptedRunner(warmup_steps=1)
    shape = ModelShape.from_config(tiny_llama(layers=3).config)
    row = bench.measure_row(
        runner, config, SparseLoRAConfig(**SPARSE), shape, BenchShape("32,8", 32, 8), "none"
    )
    A, B = "lora", "sparselora"
    assert runner.calls == [A, B, B, A, A, B, B, A]
    # Timed steps are calls 3-8: LoRA at calls 4, 5, 8 (1 s x call), SparseLoRA at 3, 6, 7
    # (0.5 s x call); the i-th steps of both methods are the i-th timed pair.
    assert row.lora.step_times == [4.0, 5.0, 8.0]
    assert row.sparselora.step_times == [1.5, 3.0, 3.5]
    assert row.paired_speedup == pytest.approx(16 / 7)  # median of 4/1.5, 5/3, 8/3.5
    assert row.speedup == pytest.approx(5 / 3)  # median 5 s / median 3 s
