"""`sparselora bench` end to end on a tiny model: output files, fields and their sanity (the
format, not the speed), same-state steps, and clear errors for bad shapes."""

from __future__ import annotations

import csv
import json
import statistics

import peft
import pytest
import torch
import transformers
import yaml
from conftest import tiny_llama

from sparselora import __version__
from sparselora.config import ConfigError
from sparselora.perf.bench import (
    BenchConfig,
    format_markdown,
    load_bench_model,
    main,
    parse_shape,
    saved_activation_bytes,
    synthetic_batch,
)

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
def bench_run(tiny_dir, sparse_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--model", str(tiny_dir), "--config", str(sparse_yaml), "--shapes", "32,8",
        "--padding", "none", "left", "--batch-size", "2", "--warmup", "1", "--steps", "2",
        "--device", "cpu", "--dtype", "float32", "--learning-rate", "0.05",
        "--threads", "1",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_writes_json_csv_markdown_and_plot(bench_run, capsys):
    results = json.loads((bench_run / "bench.json").read_text())
    header, rows = results["header"], results["rows"]
    assert header["torch"] == torch.__version__
    assert header["transformers"] == transformers.__version__
    assert header["peft"] == peft.__version__
    assert header["sparselora"] == __version__
    assert header["dtype"] == "float32" and header["device"] == "cpu"
    assert header["cpu"] and header["gpu"] is None and header["threads"] == 1
    assert header["date"][:4].isdigit()
    assert header["sparselora_config"]["ffn_sparsity"] == {"1-2": 0.75}
    assert [(r["shape"], r["padding"]) for r in rows] == [("32,8", "none"), ("32,8", "left")]

    with (bench_run / "bench.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 2
    assert float(csv_rows[0]["speedup"]) == pytest.approx(rows[0]["speedup"])
    assert "lora_step_times" not in csv_rows[0]  # lists stay in the JSON

    png = (bench_run / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| 32,8 (32, 8) | none" in (bench_run / "bench.md").read_text()


def test_rows_are_sane(bench_run):
    rows = json.loads((bench_run / "bench.json").read_text())["rows"]
    for row in rows:
        assert len(row["lora_step_times"]) == len(row["sparselora_step_times"]) == 2
        for method in ("lora", "sparselora"):
            assert 0 < row[f"{method}_min_s"] <= row[f"{method}_median_s"] <= row[f"{method}_max_s"]
            assert row[f"{method}_tokens_per_s"] == pytest.approx(
                row["real_tokens"] / row[f"{method}_median_s"]
            )
            assert row[f"{method}_peak_mib"] is None  # no peak counter on CPU
            assert row[f"{method}_saved_mib"] > 0
        assert row["speedup"] == pytest.approx(row["lora_median_s"] / row["sparselora_median_s"])
        times = zip(row["lora_step_times"], row["sparselora_step_times"], strict=True)
        ratios = [a / b for a, b in times]
        assert row["paired_speedup"] == pytest.approx(statistics.median(ratios))
        assert row["predicted_speedup"] > 1.0
        assert row["sparselora_tflops"] < row["lora_tflops"]
        assert row["fraction_of_predicted"] == pytest.approx(
            row["speedup"] / row["predicted_speedup"]
        )
        assert 0 < row["estimator_share"] < 1
        assert row["ffn_kept"] == pytest.approx(24 / 96)  # 75% of 96 FFN channels removed
        assert row["attn_kept"] == pytest.approx(0.5)
        assert row["dense_step_fraction"] == pytest.approx(0.1)
        # A tenth of the run dense: between no speedup and the full sparse speedup.
        assert min(1.0, row["speedup"]) <= row["end_to_end_speedup"] <= max(1.0, row["speedup"])
    none, left = rows
    assert none["pad_fraction"] == 0 and none["real_tokens"] == 2 * 32
    assert 0 < left["pad_fraction"] < 1 and left["real_tokens"] < 2 * 32


def test_every_step_starts_from_the_same_adapter_state(bench_run):
    """Weights are restored before each step, so repeated steps give the same loss even though
    the optimizer moves the adapters by a lot (learning rate 0.05); SparseLoRA's loss is close
    to LoRA's but not equal (it is sparse)."""
    for row in json.loads((bench_run / "bench.json").read_text())["rows"]:
        for method in ("lora", "sparselora"):
            losses = row[f"{method}_losses"]
            assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)
        assert row["sparselora_loss"] != row["lora_loss"]
        assert row["sparselora_loss"] == pytest.approx(row["lora_loss"], rel=0.2)


def test_synthetic_batch_labels_the_last_out_tokens():
    shape = parse_shape("40,6")
    batch = synthetic_batch(97, 4, shape, "left", seed=3)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (4, 40)
    assert torch.equal(labels[:, -6:], ids[:, -6:])
    assert (labels[:, :-6] == -100).all()
    real = mask.sum(dim=1)
    assert (real >= 7).all() and (real <= 40).all() and (real < 40).any()
    for row, length in enumerate(real.tolist()):  # left padding: pads first, then real tokens
        assert (mask[row, 40 - length :] == 1).all() and (ids[row, : 40 - length] == 0).all()
    unpadded = synthetic_batch(97, 4, shape, "none", seed=3)
    assert unpadded["attention_mask"].all()


def test_saved_activation_bytes_counts_distinct_non_parameter_storages():
    linear = torch.nn.Linear(10, 20, bias=False)
    x = torch.randn(5, 10)
    with saved_activation_bytes(linear) as seen:
        y = linear(x)  # saves x (5*10 floats) for the weight gradient
        z = y.exp()  # saves its output (5*20 floats)
        z.sin()  # saves z again: the same storage counts once
    assert sum(seen.values()) == 4 * (5 * 10 + 5 * 20)
    linear.weight.requires_grad_(False)
    with saved_activation_bytes(linear) as seen:
        linear(x.requires_grad_())  # saves only the (frozen) weight: a parameter, not counted
    assert sum(seen.values()) == 0


def test_named_and_custom_shapes():
    assert (parse_shape("math").seq_len, parse_shape("math").out_tokens) == (512, 128)
    assert (parse_shape("commonsense").seq_len, parse_shape("commonsense").out_tokens) == (512, 3)
    assert (parse_shape("code").seq_len, parse_shape("chat").seq_len) == (1024, 2048)
    custom = parse_shape("256,64")
    assert (custom.name, custom.seq_len, custom.out_tokens) == ("256,64", 256, 64)


@pytest.mark.parametrize("bad", ["huge", "512", "8,8", "10,0", "a,b"])
def test_bad_shape_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="shape"):
        parse_shape(bad)
    with pytest.raises(ConfigError, match="shape"):
        BenchConfig(shapes=[bad])


def test_cli_bad_shape_lists_the_allowed_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--shapes", "math", "huge", "--config", "unused.yaml"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'huge'" in message
    for name in ("math", "commonsense", "code", "chat", "L,out"):
        assert name in message


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="padding"):
        BenchConfig(padding=["right"])
    with pytest.raises(ConfigError, match="steps"):
        BenchConfig(steps=0)
    with pytest.raises(ConfigError, match="lora_targets"):
        BenchConfig(lora_targets=["qkv"])
    with pytest.raises(ConfigError, match="unknown preset"):
        BenchConfig(sparselora="no-such-preset").sparse_config()


def test_random_weights_keep_the_shape(tiny_dir):
    config = BenchConfig(model=str(tiny_dir), random_weights=True, seed=5)
    random_model = load_bench_model(config, torch.device("cpu"), torch.float32)
    trained = load_bench_model(BenchConfig(model=str(tiny_dir)), torch.device("cpu"), torch.float32)
    assert random_model.training and trained.training
    random_weight = random_model.model.layers[0].mlp.up_proj.weight
    trained_weight = trained.model.layers[0].mlp.up_proj.weight
    assert random_weight.shape == trained_weight.shape == (96, 64)
    assert not torch.equal(random_weight, trained_weight)


def test_markdown_shows_na_for_missing_memory(bench_run):
    rows = json.loads((bench_run / "bench.json").read_text())["rows"]
    table = format_markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "speedup" in lines[0] and "estimator" in lines[0]
    assert "n/a → n/a" in lines[2]  # CPU peak memory
    assert f"{rows[0]['speedup']:.2f}x" in lines[2]
