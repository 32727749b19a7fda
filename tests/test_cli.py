"""The command line: parsing, dispatch and clear errors (no training here)."""

from __future__ import annotations

import pytest

from sparselora import cli


def test_train_accepts_overrides_without_a_config_file(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "sparselora.train.train", lambda config: seen.setdefault("config", config) and {}
    )
    assert (
        cli.main(["train", "training.max_steps=3", "data.max_length=64", "--method", "lora"]) == 0
    )
    config = seen["config"]
    assert (config.training.max_steps, config.data.max_length, config.training.method) == (
        3,
        64,
        "lora",
    )


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
    assert cli.main(["env"]) == 0
    assert "transformers" in capsys.readouterr().out


def test_every_subcommand_has_help():
    for command in ("train", "eval", "export", "presets", "env"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
