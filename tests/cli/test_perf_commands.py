"""`sparselora flops`, `bench` and `composed`: the documented command lines parse to the configs
they mean, `--help` lists the documented flags, a bad value is one clear error (exit code 2),
and each command runs end to end on a tiny model."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import yaml
from conftest import tiny_llama

from sparselora.cli.options import dataclass_from_args
from sparselora.cli.perf_commands import register
from sparselora.engine.flops import flops_table
from sparselora.perf.bench import BenchConfig
from sparselora.perf.composed import ComposedConfig
from sparselora.perf.report import flops_markdown
from sparselora.presets import PRESETS

DOCUMENTED = {
    "bench": [
        "--preset", "--config", "--model", "--random-weights", "--estimator", "--shapes",
        "--padding", "--batch-size", "--warmup", "--steps", "--lora-rank", "--lora-alpha",
        "--lora-targets", "--learning-rate", "--dtype", "--device", "--attn-implementation",
        "--threads", "--calibration-batches", "--seed", "--output-dir",
    ],
    "composed": [
        "--preset", "--config", "--model", "--estimator", "--validate", "--shapes",
        "--batch-size", "--warmup", "--steps", "--lora-rank", "--lora-targets", "--dtype",
        "--device", "--threads", "--seed", "--output-dir",
    ],
    "flops": [
        "--preset", "--config", "--all-presets", "--model", "--task", "--all-tasks", "--seq-len",
        "--out-tokens", "--batch", "--lora-rank", "--lora-targets", "--logits-on-output-only",
        "--no-exact-savings", "--format",
    ],
}  # fmt: skip


def build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparselora")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def run(argv: list[str]) -> int:
    args = build().parse_args(argv)
    return args.func(args)


def config_of(argv: list[str]):
    args = build().parse_args(argv)
    return dataclass_from_args(BenchConfig if argv[0] == "bench" else ComposedConfig, args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 3-layer model directory and a SparseLoRA config for it."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=3).save_pretrained(root / "model")
    config = root / "sparse.yaml"
    config.write_text(yaml.safe_dump({"ffn_sparsity": {"1-2": 0.75}, "estimator_rank": 4}))
    return root / "model", config


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_help_lists_the_documented_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: sparselora {command} ")
    for flag in DOCUMENTED[command]:
        assert re.search(re.escape(flag) + r"(?![\w-])", text), flag
    assert "--verbose" not in text  # the shared -v is added by the app


def test_documented_bench_command_lines():
    config = config_of(
        [
            "bench",
            "--shapes",
            "math",
            "--padding",
            "none",
            "left",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--steps",
            "5",
            "--threads",
            "2",
        ]
    )
    assert (config.shapes, config.padding, config.batch_size) == (["math"], ["none", "left"], 4)
    assert (config.warmup_steps, config.steps, config.threads) == (1, 5, 2)
    assert (config.model, config.sparselora, config.estimator) == (
        "smollm2-135m-instruct",
        "smollm2-135m-gsm8k",
        "config",
    )
    assert config.random_weights is False and config.output_dir == "runs/bench"
    # benchmarks/gpu_bench.sh
    config = config_of(
        [
            "bench",
            "--model",
            "llama3-8b",
            "--random-weights",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--batch-size",
            "1",
            "--warmup",
            "3",
            "--steps",
            "10",
            "--estimator",
            "svd",
            "--output-dir",
            "runs/gpu/x",
            "--preset",
            "llama3-8b-math10k",
            "--shapes",
            "math",
            "--padding",
            "none",
            "left",
        ]
    )
    assert (config.model, config.random_weights, config.dtype, config.estimator) == (
        "llama3-8b",
        True,
        "bfloat16",
        "svd",
    )
    assert (config.sparselora, config.output_dir) == ("llama3-8b-math10k", "runs/gpu/x")
    config = config_of(
        ["bench", "--config", "sparse.yaml", "--shapes", "256,64", "math", "--model", "DIR"]
    )
    assert (config.sparselora, config.shapes, config.model) == (
        "sparse.yaml",
        ["256,64", "math"],
        "DIR",
    )
    for targets in (["q_proj,k_proj"], ["q_proj", "k_proj"]):
        assert config_of(["bench", "--lora-targets", *targets]).lora_targets == [
            "q_proj",
            "k_proj",
        ]


def test_documented_composed_command_lines():
    config = config_of(
        [
            "composed",
            "--model",
            "llama3-8b",
            "--preset",
            "llama3-8b-math10k",
            "--shapes",
            "math",
            "--batch-size",
            "1",
            "--warmup",
            "1",
            "--steps",
            "9",
            "--threads",
            "2",
        ]
    )
    assert (config.model, config.sparselora, config.shapes) == (
        "llama3-8b",
        "llama3-8b-math10k",
        ["math"],
    )
    assert (config.batch_size, config.warmup_steps, config.steps, config.threads) == (1, 1, 9, 2)
    assert config.estimator == "svd" and config.validate is False
    config = config_of(
        [
            "composed",
            "--model",
            "smollm2-135m",
            "--preset",
            "smollm2-135m-gsm8k",
            "--shapes",
            "math",
            "--batch-size",
            "4",
            "--validate",
        ]
    )
    assert (config.model, config.batch_size, config.validate) == ("smollm2-135m", 4, True)
    assert config_of(["composed", "--estimator", "config"]).estimator == "config"
    assert config_of(["composed"]).output_dir == "runs/composed"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["bench", "--dtype", "float8"],
            "sparselora bench: error: dtype = 'float8' is not allowed; "
            "choose from ['auto', 'float32', 'bfloat16', 'float16']",
        ),
        (
            ["bench", "--padding", "none", "right"],
            "sparselora bench: error: padding = ['right'] is not allowed; "
            "choose from ['none', 'left']",
        ),
        (
            ["composed", "--estimator", "pca"],
            "sparselora composed: error: estimator = 'pca' is not allowed; "
            "choose from ['svd', 'whitened_svd', 'config']",
        ),
        (
            ["bench", "--lora-targets", "qkv"],
            "sparselora bench: error: lora_targets = ['qkv'] is not allowed; choose from "
            "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', "
            "'qkv_proj', 'gate_up_proj', 'in_proj_qkv', 'in_proj_z', 'in_proj_b', 'in_proj_a', "
            "'out_proj']",
        ),
        (["bench", "--steps", "0"], "sparselora bench: error: steps must be an integer >= 1"),
        (
            ["composed", "--preset", "no-such-preset"],
            "sparselora composed: error: unknown preset 'no-such-preset'; available: [",
        ),
        (
            ["composed", "--model", "no-such-model"],
            "sparselora composed: error: model = 'no-such-model': model 'no-such-model' is "
            "neither a known model",
        ),
    ],
)
def test_a_bad_value_is_one_error_naming_the_field(argv, message, capsys):
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert captured.out == ""


def test_a_bad_shape_lists_the_allowed_names(capsys):
    assert run(["bench", "--shapes", "math", "huge"]) == 2
    message = capsys.readouterr().err
    assert "'huge'" in message
    for name in ("math", "commonsense", "code", "chat", "L,out"):
        assert name in message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--preset", "a", "--config", "b.yaml"], "not allowed with argument"),
        (["bench", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
        (["flops"], "one of the arguments --preset --config --all-presets is required"),
        (["flops", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    ],
)
def test_argparse_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_flops(capsys):
    assert run(["flops", "--preset", "llama3-8b-math10k"]) == 0
    rows = flops_table(presets=["llama3-8b-math10k"])
    assert capsys.readouterr().out.strip() == flops_markdown(rows)
    assert (
        run(["flops", "--preset", "llama3-8b-csr", "--model", "llama3.1-8b", "--seq-len", "256"])
        == 0
    )
    assert "| llama3-8b-csr | llama3.1-8b | custom (256, 3) |" in capsys.readouterr().out
    assert run(["flops", "--all-presets", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(PRESETS)


def test_flops_transfer_moves_the_preset_by_relative_depth(capsys, tmp_path):
    from sparselora.config import get_preset
    from sparselora.engine.flops import compare
    from sparselora.engine.shapes import load_shape

    argv = ["flops", "--preset", "llama3-8b-math10k", "--model", "qwen3-8b", "--format", "json"]
    assert run([*argv, "--transfer"]) == 0
    moved = json.loads(capsys.readouterr().out)[0]
    assert run(argv) == 0
    same_indices = json.loads(capsys.readouterr().out)[0]
    shape = load_shape("qwen3-8b")
    assert shape.num_layers == 36
    expected = compare(shape, 512, 128, get_preset("llama3-8b-math10k").at_depth(32, 36))
    assert moved["preset"] == "llama3-8b-math10k @ 36 layers"
    assert moved["sparselora_tflops"] == pytest.approx(expected["sparselora_tflops"], rel=1e-12)
    # 3-30 of 32 moved to 36 layers is 3-34: more sparse layers, fewer FLOPs than 3-30 of 36
    assert moved["sparselora_tflops"] < same_indices["sparselora_tflops"]
    no_preset = tmp_path / "sparse.yaml"
    no_preset.write_text(yaml.safe_dump({"ffn_sparsity": {"3-30": 0.99}}))
    assert run(["flops", "--config", str(no_preset), "--model", "qwen3-8b", "--transfer"]) == 2
    assert "--transfer moves a preset" in capsys.readouterr().err


def test_flops_speedups_of_docs_flops_md(capsys):
    """docs/FLOPS.md: llama3-8b-math10k at math is 2.42x, 2.06x without the exact savings."""
    for flag, speedup in (([], 2.42), (["--no-exact-savings"], 2.06)):
        assert run(["flops", "--preset", "llama3-8b-math10k", "--format", "json", *flag]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert round(row["speedup"], 2) == speedup


def test_flops_lora_targets_space_or_comma_separated(capsys):
    outputs = []
    for targets in (["q_proj,v_proj"], ["q_proj", "v_proj"], []):
        lora = ["--lora-targets", *targets] if targets else []
        assert run(["flops", "--preset", "llama3-8b-csr", "--format", "json", *lora]) == 0
        outputs.append(json.loads(capsys.readouterr().out)[0]["lora"]["lora"])
    assert outputs[0] == outputs[1] < outputs[2]  # two adapted projections instead of four


def test_flops_errors_name_the_problem(capsys):
    assert run(["flops", "--preset", "llama2-13b-csr", "--model", "llama2-7b"]) == 2
    assert "names layer 32" in capsys.readouterr().err  # a 40-layer preset on 32 layers
    assert run(["flops", "--all-presets", "--model", "llama3-8b"]) == 2
    assert "own model and task shapes" in capsys.readouterr().err


def test_bench_runs_and_writes(tiny, tmp_path, capsys):
    model, sparse = tiny
    argv = [
        "bench", "--model", str(model), "--config", str(sparse), "--shapes", "32,8",
        "--padding", "none", "--batch-size", "2", "--warmup", "0", "--steps", "1",
        "--device", "cpu", "--dtype", "float32", "--threads", "1", "--output-dir", str(tmp_path),
    ]  # fmt: skip
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "| 32,8 (32, 8) | none (0% pad) |" in out
    written = ["bench.json", "bench.csv", "bench.md", "bench.png"]
    assert f"results: {', '.join(str(tmp_path / name) for name in written)}" in out
    assert all((tmp_path / name).is_file() for name in written)


def test_composed_runs_and_writes(tiny, tmp_path, capsys):
    model, sparse = tiny
    argv = [
        "composed", "--model", str(model), "--config", str(sparse), "--shapes", "32,8",
        "--batch-size", "2", "--warmup", "0", "--steps", "1", "--lora-rank", "4", "--device",
        "cpu", "--dtype", "float32", "--threads", "1", "--output-dir", str(tmp_path),
    ]  # fmt: skip
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "| 32,8 (32, 8) | 2 |" in out and "Parts of 32,8 (32, 8):" in out
    written = ["composed.json", "composed.csv", "composed_parts.csv", "composed.md"]
    assert f"results: {', '.join(str(tmp_path / name) for name in written)}" in out
