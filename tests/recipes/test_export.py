"""`export_merged` never loses data: it writes only to a new folder or over a previous export,
never into or above the run folder, and leaves no temporary folder behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from sparselora.recipes import commands
from sparselora.recipes.commands import EXPORT_MARKER, export_merged
from sparselora.recipes.run_config import RunConfig
from sparselora.version import __version__
from tests.conftest import train_tiny_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished run folder (2 steps, a checkpoint per step) on a tiny local LLaMA."""
    root = tmp_path_factory.mktemp("trained")
    return train_tiny_run(root, 2, 32, "training.save_steps=1")


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, in a folder of its own under `tmp_path / "work"`."""
    path = tmp_path / "work" / "run"
    shutil.copytree(trained_run, path)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def no_model_loading(monkeypatch) -> None:
    """Make loading the run's model fail: a refusal must come before any expensive work."""

    def load_run(run_dir):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(commands, "load_run", load_run)


def test_export_writes_a_marked_merged_model_into_run_merged(run):
    before = snapshot(run)
    merged_dir = export_merged(run)
    assert merged_dir == run / "merged"
    marker = json.loads((merged_dir / EXPORT_MARKER).read_text())
    assert marker["run"] == str(run.resolve()) and marker["sparselora_version"] == __version__
    assert marker["created"] and marker["max_logit_difference"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert model(input_ids=torch.tensor([[5, 17, 300]])).logits.shape == (1, 3, model.vocab_size)
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("merged/")} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no temporary folder left


@pytest.mark.parametrize("where", ["run", "run/merged/..", "run/adapter/.."])
def test_export_refuses_the_run_folder_as_output(run, monkeypatch, where):
    before = snapshot(run)
    no_model_loading(monkeypatch)
    with pytest.raises(ValueError, match="run folder") as error:
        export_merged(run, run.parent / where)
    assert str(run) in str(error.value) and "--output" in str(error.value)
    with pytest.raises(ValueError, match="run folder"):
        export_merged(run, run.parent / where, overwrite=True)
    assert snapshot(run) == before


@pytest.mark.parametrize("levels_up", [1, 2])
def test_export_refuses_a_folder_above_the_run(run, monkeypatch, levels_up):
    above = run.parents[levels_up - 1]
    (run.parent / "notes.txt").write_text("the user's own file beside the run")
    before = snapshot(above)
    no_model_loading(monkeypatch)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="contains the run folder") as error:
            export_merged(run, above, overwrite=overwrite)
        assert str(above) in str(error.value)
    assert snapshot(above) == before


@pytest.mark.parametrize("inside", ["adapter", "checkpoint-2", "merged/model", "new"])
def test_export_refuses_other_folders_inside_the_run(run, monkeypatch, inside):
    before = snapshot(run)
    no_model_loading(monkeypatch)
    with pytest.raises(ValueError, match="inside the run folder") as error:
        export_merged(run, run / inside, overwrite=True)
    assert "merged" in str(error.value)
    assert snapshot(run) == before


def test_export_refuses_an_existing_file_before_any_work(run, monkeypatch):
    target = run.parent / "model.bin"
    target.write_text("the user's file")
    no_model_loading(monkeypatch)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is a file") as error:
            export_merged(run, target, overwrite=overwrite)
        assert str(target) in str(error.value)
    assert target.read_text() == "the user's file"
    assert sorted(p.name for p in run.parent.iterdir()) == ["model.bin", "run"]


def test_export_refuses_a_non_empty_folder_that_is_no_export(run, monkeypatch):
    target = run.parent / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("the user's data")
    no_model_loading(monkeypatch)
    with pytest.raises(ValueError, match="--overwrite") as error:
        export_merged(run, target)
    assert str(target) in str(error.value)
    with pytest.raises(ValueError, match=EXPORT_MARKER):
        export_merged(run, target, overwrite=True)  # --overwrite replaces only a previous export
    assert snapshot(target) == {"keep.txt": hashlib.sha256(b"the user's data").hexdigest()}


def test_export_into_an_empty_folder(run):
    target = run.parent / "empty"
    target.mkdir()
    assert export_merged(run, target) == target
    assert (target / EXPORT_MARKER).exists()


def test_overwrite_replaces_a_previous_export_only(run):
    target = run.parent / "exported"
    export_merged(run, target)
    first = json.loads((target / EXPORT_MARKER).read_text())
    with pytest.raises(ValueError, match="--overwrite"):
        export_merged(run, target)
    (target / "stale.txt").write_text("left from the previous export")
    assert export_merged(run, target, overwrite=True) == target
    second = json.loads((target / EXPORT_MARKER).read_text())
    assert second["created"] >= first["created"]
    assert not (target / "stale.txt").exists()  # replaced as a whole, not patched
    assert sorted(p.name for p in run.parent.iterdir()) == ["exported", "run"]
    # The default RUN/merged is a previous export too.
    export_merged(run)
    with pytest.raises(ValueError, match="--overwrite"):
        export_merged(run)
    assert export_merged(run, overwrite=True) == run / "merged"


def failing_save(monkeypatch) -> None:
    """Make `save_pretrained` write part of a model and then fail, as a full disk would."""

    def save_pretrained(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, "model.safetensors").write_bytes(b"half written")
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)


def test_failed_export_leaves_no_temporary_folder(run, monkeypatch):
    failing_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        export_merged(run, run.parent / "out")
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    with pytest.raises(OSError, match="No space left"):
        export_merged(run)
    assert not (run / "merged").exists()
    assert not [p for p in run.iterdir() if "merged" in p.name]


def test_failed_overwrite_keeps_the_previous_export(run, monkeypatch):
    target = run.parent / "exported"
    export_merged(run, target)
    before = snapshot(target)
    failing_save(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        export_merged(run, target, overwrite=True)
    assert snapshot(target) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["exported", "run"]


def test_temporary_folder_does_not_collide_with_user_data(run):
    """A user folder named like a fixed temporary name (`OUTPUT.tmp`) is not touched."""
    for name in ("merged.tmp", "out.tmp"):
        folder = (run if name == "merged.tmp" else run.parent) / name
        folder.mkdir()
        (folder / "keep.txt").write_text("the user's data")
    export_merged(run)
    export_merged(run, run.parent / "out")
    assert (run / "merged.tmp" / "keep.txt").read_text() == "the user's data"
    assert (run.parent / "out.tmp" / "keep.txt").read_text() == "the user's data"


def test_a_qlora_run_is_evaluated_in_4bit_and_merged_into_the_float_base(run, monkeypatch):
    config = RunConfig.load(run / "run.yaml")
    config.model.load_in_4bit = True
    config.save(run / "run.yaml")
    asked = []
    real = commands.load_model

    def load_model(*args, **kwargs):
        asked.append(kwargs["load_in_4bit"])
        return real(*args, **{**kwargs, "load_in_4bit": False})  # the tiny model stays float

    monkeypatch.setattr(commands, "load_model", load_model)
    commands.load_run(run)
    export_merged(run)
    assert asked == [True, False]
