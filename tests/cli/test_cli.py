"""The command line: parsing, dispatch and clear errors (no training here)."""

from __future__ import annotations

import pytest

from sparselora.cli import app as cli


def test_train_accepts_overrides_with_or_without_a_config_file(monkeypatch):
    seen = []
    monkeypatch.setattr("sparselora.recipes.train.train", lambda config: seen.append(config) or {})
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
        "sparselora.cli.run_commands.run_demo", lambda config: seen.append(config) or "table"
    )
    assert cli.main(["demo", "--steps", "3", "--out", "runs/x", "--batch-size", "2"]) == 0
    assert (seen[0].steps, seen[0].out, seen[0].batch_size, seen[0].seed) == (3, "runs/x", 2, 42)
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
