"""Bad input is one clear error, at once, naming the file, line or field: YAML and JSON syntax,
number notations, non-positive counts, non-UTF-8 bytes, missing model paths, corrupt and
non-finite weights (issue 12, "Lose nothing, ever")."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from sparselora.cli import app as cli
from sparselora.config import ConfigError, SparseLoRAConfig
from sparselora.recipes.loading import (
    EMBEDDED_MODELS,
    MAX_ABS_WEIGHT,
    ModelError,
    load_model,
    load_tokenizer,
)
from sparselora.recipes.records import DataError, load_records
from sparselora.recipes.run_config import RunConfig

# -- a. YAML syntax and shape ----------------------------------------------------------------------


def test_yaml_syntax_error_in_a_run_config_names_file_line_and_column(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("training:\n  max_steps: 3\n  epochs: [1\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 4, column 1: not valid YAML: expected ',' or ']'")
    assert "flow sequence" in message and "line 3, column 11" in message
    assert "<unicode string>" not in message and "\n" not in message


def test_tab_indentation_names_the_line(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("training:\n\tmax_steps: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}, line 2, column 1: not valid YAML")):
        RunConfig.load(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_syntax_error_in_a_sparselora_config_or_preset_file_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"preset{suffix}"
    path.write_text('{"ffn_sparsity": {"1": 0.5},\n "estimator": [}\n')
    kind = "YAML" if suffix == ".yaml" else "JSON"
    expected = re.escape(f"{path}, line 2, column ") + rf"\d+: not valid {kind}"
    with pytest.raises(ConfigError, match=expected):
        SparseLoRAConfig.load(path)
    with pytest.raises(ConfigError, match="sparselora: " + expected):
        RunConfig.load(None, [f"sparselora.preset={path}"])


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", "3\n"])
def test_a_run_config_that_is_not_a_mapping_lists_the_sections(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: expected a mapping with sections")):
        RunConfig.load(path)


def test_a_duplicate_key_is_refused_not_silently_dropped(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("training:\n  max_steps: 3\nlora:\n  r: 8\ntraining:\n  epochs: 2\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}, line 5, column 1: not valid YAML: duplicate key")
    ):
        RunConfig.load(path)


def test_an_override_that_is_not_valid_yaml_names_the_override():
    with pytest.raises(ConfigError, match=re.escape("override 'lora.target_modules=[q_proj'")):
        RunConfig.load(None, ["lora.target_modules=[q_proj"])


def test_cli_reports_a_yaml_error_in_one_line_with_exit_2(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text("training:\n  epochs: [1\n")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparselora: config error: {path}, line 3, column 1: not valid YAML")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_folder_given_as_the_run_config_is_one_line(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"sparselora: config error: config file {tmp_path} is not a file\n"


def test_an_unreadable_sparselora_config_is_one_line(tmp_path, capsys):
    assert cli.main(["estimator", "build", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparselora: error: ") and err.count("\n") == 1


# -- b. numbers in every notation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-4", 1e-4), ("1E-4", 1e-4), ("1.0e-4", 1e-4), ("1.0e4", 1e4), ("+3e-4", 3e-4),
     (".5", 0.5), ("2", 2.0), ("1_0e-1", 1.0), ("0.000_1", 1e-4)],
)  # fmt: skip
def test_float_fields_accept_every_number_notation(tmp_path, text, value):
    from_override = RunConfig.load(None, [f"training.learning_rate={text}"])
    assert from_override.training.learning_rate == pytest.approx(value)
    assert isinstance(from_override.training.learning_rate, float)
    path = tmp_path / "run.yaml"
    path.write_text(f"training:\n  learning_rate: {text}\n")
    assert RunConfig.load(path).training.learning_rate == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "value"), [("1e3", 1000), ("1E3", 1000), ("+3", 3), ("1_000", 1000), ("2.0", 2)]
)
def test_int_fields_accept_integral_numbers_in_any_notation(tmp_path, text, value):
    config = RunConfig.load(None, [f"training.max_steps={text}"])
    assert config.training.max_steps == value and isinstance(config.training.max_steps, int)
    path = tmp_path / "run.yaml"
    path.write_text(f"training:\n  max_steps: {text}\n")
    assert RunConfig.load(path).training.max_steps == value


@pytest.mark.parametrize("text", ["1.5", "2.5e0", "1e-3"])
def test_an_int_field_refuses_a_fraction(text):
    with pytest.raises(ConfigError, match=r"training\.max_steps must be an integer, got"):
        RunConfig.load(None, [f"training.max_steps={text}"])


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan"])
def test_a_float_field_refuses_a_non_finite_number(text):
    with pytest.raises(ConfigError, match=r"training\.learning_rate must be a finite number"):
        RunConfig.load(None, [f"training.learning_rate={text}"])


def test_a_string_that_looks_like_a_number_round_trips_through_a_saved_run_config(tmp_path):
    config = RunConfig.load(None, ["training.output_dir='1e3'"])
    config.save(tmp_path / "run.yaml")
    assert RunConfig.load(tmp_path / "run.yaml").training.output_dir == "1e3"


def test_sparselora_fields_from_a_dict_accept_integral_floats_and_exponents():
    config = SparseLoRAConfig.from_dict({"estimator_rank": 1.6e1, "calibration_damping": 1})
    assert config.estimator_rank == 16 and isinstance(config.estimator_rank, int)
    assert config.calibration_damping == 1.0
    with pytest.raises(ConfigError, match="estimator_rank must be an integer"):
        SparseLoRAConfig.from_dict({"estimator_rank": 8.5})


# -- c. SparseLoRA fields through the run config ---------------------------------------------------


def test_calibration_damping_in_exponent_notation_is_a_number():
    config = RunConfig.load(None, ["sparselora.calibration_damping=1e-3"])
    assert config.sparse_config().calibration_damping == pytest.approx(1e-3)


@pytest.mark.parametrize("value", ["abc", "[1]", "-1e-3"])
def test_a_bad_calibration_damping_names_the_field(value):
    with pytest.raises(ConfigError, match=r"sparselora: calibration_damping must be a number >= 0"):
        RunConfig.load(None, [f"sparselora.calibration_damping={value}"])
    with pytest.raises(ConfigError, match=r"calibration_damping must be a number >= 0"):
        SparseLoRAConfig(calibration_damping=value)


@pytest.mark.parametrize("value", ["5", "[a]", "true"])
def test_a_preset_that_is_not_a_name_lists_the_presets(value):
    with pytest.raises(ConfigError) as err:
        RunConfig.load(None, [f"sparselora.preset={value}"])
    message = str(err.value)
    assert message.startswith("sparselora: preset = ") and "smollm2-135m-gsm8k" in message
    assert ".yaml" in message  # a preset file is allowed too


def test_cli_reports_a_bad_preset_in_one_line(capsys):
    assert cli.main(["train", "sparselora.preset=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparselora: config error: sparselora: preset = 5")
    assert err.count("\n") == 1


# -- d. nothing to train ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("training.epochs=0", "training.epochs"),
        ("training.epochs=-1", "training.epochs"),
        ("training.max_steps=0", "training.max_steps"),
        ("training.max_steps=-5", "training.max_steps"),
        ("training.batch_size=0", "training.batch_size"),
        ("training.gradient_accumulation=0", "training.gradient_accumulation"),
        ("training.save_steps=-1", "training.save_steps"),
        ("training.save_total_limit=-1", "training.save_total_limit"),
        ("training.eval_steps=-1", "training.eval_steps"),
        ("training.weight_decay=-0.1", "training.weight_decay"),
        ("training.seed=-1", "training.seed"),
        ("data.max_train_examples=0", "data.max_train_examples"),
        ("data.max_eval_examples=0", "data.max_eval_examples"),
        ("logging.logging_steps=0", "logging.logging_steps"),
    ],
)
def test_a_count_that_trains_nothing_is_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        RunConfig.load(None, [override])


def test_epochs_may_be_zero_when_max_steps_sets_the_length():
    config = RunConfig.load(None, ["training.epochs=0", "training.max_steps=5"])
    assert config.training.max_steps == 5


def test_cli_refuses_zero_epochs_before_training(monkeypatch, capsys):
    trained = []
    monkeypatch.setattr("sparselora.recipes.train.train", lambda config: trained.append(config))
    assert cli.main(["train", "training.epochs=0"]) == 2
    assert "training.epochs" in capsys.readouterr().err and not trained


# -- e. bytes that are not UTF-8 -------------------------------------------------------------------


def test_a_non_utf8_byte_in_jsonl_names_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = ['{"prompt": "a", "completion": "b"}', "", '{"prompt": "caf\u00e9", "completion": "x"}']
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == (
        f"{path}, line 3, column 16: not UTF-8 text (byte 0xe9: invalid continuation byte); "
        "save the file as UTF-8"
    )


def test_a_non_utf8_byte_deep_in_a_large_jsonl_names_its_line(tmp_path):
    path = tmp_path / "big.jsonl"
    good = b'{"prompt": "' + b"x" * 100 + b'", "completion": "y"}\n'
    path.write_bytes(good * 2000 + b'{"prompt": "\xff", "completion": "y"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2001, column 13: not UTF-8")):
        load_records(path)


def test_a_non_utf8_byte_in_a_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "\xe9"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3, column 20: not UTF-8 text")):
        load_records(path)


def test_a_non_utf8_byte_in_a_run_config_names_line_and_column(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"training:\n  output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}, line 2, column 18: not UTF-8 text")):
        RunConfig.load(path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}, line 2, column 18: not UTF-8 text")):
        SparseLoRAConfig.load(path)


# -- f. a model directory that does not exist ------------------------------------------------------


MISSING = ["./no/such/dir", "/abs/missing/model", "~/no-such-model-dir", "../no-such-dir",
           "runs/x/final", r"C:\models\x", "no-such-dir/"]  # fmt: skip


@pytest.mark.parametrize("name", MISSING)
def test_a_missing_local_model_path_fails_at_once_naming_it(name):
    start = time.perf_counter()
    with pytest.raises(ModelError, match=re.escape(f"model directory {name} does not exist")):
        load_model(name, "float32")
    with pytest.raises(ModelError, match=re.escape(f"model directory {name} does not exist")):
        load_tokenizer(name)
    assert time.perf_counter() - start < 2.0


def test_a_local_path_to_a_file_or_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'weights.bin'} is not a folder")):
        load_model(str(tmp_path / "weights.bin"), "float32")
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path} has no config.json")):
        load_model(str(tmp_path), "float32")


def test_a_home_relative_model_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_llama(layers=1).save_pretrained(tmp_path / "mine")
    assert load_model("~/mine", "float32").config.num_hidden_layers == 1


def test_a_hub_id_the_hub_cannot_provide_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", offline)
    with pytest.raises(ModelError) as err:
        load_model("no-such-org/no-such-model", "float32")
    assert str(err.value) == (
        "cannot load model no-such-org/no-such-model: We couldn't connect to "
        "'https://huggingface.co'. Check your connection."
    )


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "model.name=./no/such/dir", f"training.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == "sparselora: error: model directory ./no/such/dir does not exist"


# -- g. corrupt and non-finite weights -------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path):
    tiny_llama(layers=2).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize(
    "keep", [lambda n: n // 2, lambda n: 20, lambda n: 0], ids=["data", "header", "empty"]
)
def test_a_truncated_safetensors_file_is_one_error_naming_the_file(tiny_dir, keep):
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep(len(data))])
    with pytest.raises(ModelError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_model(str(tiny_dir), "float32")


def _poison(folder: Path, name: str, value: float) -> None:
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors[name].view(-1)[7] = value
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("value", "what"), [(float("nan"), "NaN"), (float("inf"), "inf"), (-1e30, "-1e+30")]
)
def test_weights_that_are_not_finite_or_absurd_are_refused_naming_the_parameter(
    tiny_dir, value, what
):
    _poison(tiny_dir, "model.layers.1.mlp.up_proj.weight", value)
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_dir), "float32")
    message = str(err.value)
    assert message.startswith(f"{tiny_dir}: weight model.layers.1.mlp.up_proj.weight holds {what}")


def test_a_flipped_top_exponent_bit_is_caught(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    tensors = load_file(weights)
    bits = tensors["model.layers.0.mlp.down_proj.weight"].view(-1).view(torch.int32)
    bits[3] ^= 1 << 30  # float32: sign 31, exponent 30-23; a weight below 2 grows by 2**128
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"weight model\.layers\.0\.mlp\.down_proj\.weight holds"):
        load_model(str(tiny_dir), "float32")


def test_bfloat16_weights_are_checked_too(tiny_dir):
    _poison(tiny_dir, "model.layers.0.self_attn.q_proj.weight", float("nan"))
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds NaN"):
        load_model(str(tiny_dir), "bfloat16")


def test_healthy_weights_load(tiny_dir):
    model = load_model(str(tiny_dir), "float32")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_the_embedded_models_pass_the_weight_check_by_a_wide_margin(name):
    model = load_model(name, "float32")
    assert max(p.abs().max().item() for p in model.parameters()) < MAX_ABS_WEIGHT / 1e6
