"""The run folder loses nothing: finished runs stay finished, a different run is refused (or moved
aside), a kill at any phase of a save resumes from the newest complete checkpoint, totals span
resumes, and a corrupt checkpoint is skipped. Tiny local model; every run is a few steps."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from sparselora.config import SparseLoRAConfig
from sparselora.recipes.run_config import RunConfig, apply_override
from sparselora.recipes.train import last_complete_checkpoint, train
from tests.recipes.test_train import data_file, run_config, tiny_dir  # noqa: F401 (fixtures)

KILL_AT = "SPARSELORA_TEST_KILL_AT"


class InterruptAt(TrainerCallback):
    """Ctrl-C right after optimizer step `step` (before that step's checkpoint is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def with_overrides(config: RunConfig, *items: str) -> RunConfig:
    data = config.to_dict()
    for item in items:
        apply_override(data, item)
    return RunConfig.from_dict(data)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: modification time and content hash."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def curve(summary: dict) -> list[tuple[int, float]]:
    return [(p["step"], p["loss"]) for p in summary["train_loss_curve"]]


@pytest.fixture(scope="module")
def reference(tiny_dir, data_file, tmp_path_factory):  # noqa: F811
    """An uninterrupted 4-step run (checkpoints every 2 steps): its summary and adapter."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = train(run_config(tiny_dir, data_file, out, max_steps=4, save_steps=2))
    return {"summary": summary, "adapter": adapter(out)}


# -- case 2: a finished run stays finished ---------------------------------------------------


def test_a_finished_run_is_reported_finished_and_left_untouched(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
    caplog,
):
    out = tmp_path / "run"
    first = train(run_config(tiny_dir, data_file, out, max_steps=2, save_steps=1))
    before = snapshot(out)
    with caplog.at_level("INFO", logger="sparselora"):
        again = train(run_config(tiny_dir, data_file, out, max_steps=2, save_steps=1))
    assert again == json.loads(json.dumps(first))
    assert snapshot(out) == before  # no step 3, no deleted checkpoint, adapter not rewritten
    assert any("finished" in r.getMessage() for r in caplog.records)

    # a larger max_steps continues the run; the finished result at step 2 is kept
    grown = train(run_config(tiny_dir, data_file, out, max_steps=3, save_steps=1))
    assert grown["steps"] == 3 and grown["resumed_from"].endswith("checkpoint-2")
    assert [step for step, _ in curve(grown)] == [1, 2, 3]
    assert curve(grown)[:2] == curve(first)
    kept = out / "finished-step-2"
    assert json.loads((kept / "summary.json").read_text())["steps"] == 2
    assert yaml.safe_load((kept / "run.yaml").read_text())["training"]["max_steps"] == 2
    kept_weights = (kept / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (
        hashlib.sha256(kept_weights).hexdigest() == before["adapter/adapter_model.safetensors"][1]
    )

    # epochs instead of max_steps: the same total (24 examples / batch 4 = 6 steps per epoch)
    before = snapshot(out)
    by_epochs = train(run_config(tiny_dir, data_file, out, epochs=0.5, save_steps=1))
    assert by_epochs == json.loads(json.dumps(grown)) and snapshot(out) == before

    # a shorter schedule would change the result: refused, nothing touched
    with pytest.raises(ValueError, match=r"training\.max_steps: 3 -> 2.*--overwrite"):
        train(run_config(tiny_dir, data_file, out, max_steps=2, save_steps=1))
    assert snapshot(out) == before


def test_a_run_killed_after_its_last_checkpoint_finishes_without_more_steps(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "run"
    config = run_config(tiny_dir, data_file, out, max_steps=2, save_steps=1)
    first = train(config)
    expected = adapter(out)
    for name in ("summary.json", "loss.png", "trainer_state.json"):  # killed before these
        (out / name).unlink()
    again = train(config)
    assert again["resumed_from"].endswith("checkpoint-2")
    same = ("steps", "train_loss_curve", "train_flops", "flops_saved", "eval_loss",
            "median_step_seconds", "tokens_per_second")  # fmt: skip
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    assert_same_adapter(adapter(out), expected)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# -- case 3: a different run is refused, or moved aside ---------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_dir, data_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("finished") / "run"
    config = run_config(tiny_dir, data_file, out, max_steps=2, save_steps=1)
    return config, train(config)


@pytest.mark.parametrize(
    "override, shown",
    [
        ("lora.r=8", "lora.r: 32 -> 8"),
        ("training.method=lora", "training.method: 'sparselora' -> 'lora'"),
        ("training.seed=7", "training.seed: 42 -> 7"),
        ("training.learning_rate=0.02", "training.learning_rate: 0.01 -> 0.02"),
        ("data.max_length=32", "data.max_length: 64 -> 32"),
        ("sparselora.ffn_sparsity=0.25", "sparselora.ffn_sparsity"),
        ("data.train=/nonexistent/other.json", "data.train"),  # refused before loading it
        ("model.name=/nonexistent/model", "model.name"),
    ],
)
def test_a_different_run_is_refused_and_nothing_is_written(finished_run, override, shown):
    config, _ = finished_run
    out = Path(config.training.output_dir)
    before = snapshot(out)
    with pytest.raises(ValueError) as error:
        train(with_overrides(config, override))
    message = str(error.value)
    assert shown in message, message
    assert "training.output_dir" in message and "--overwrite" in message, message
    assert type(error.value).__name__ == "RunFolderError"
    assert snapshot(out) == before


def test_keys_that_do_not_change_the_result_may_differ(
    finished_run,
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
):
    config, summary = finished_run
    out = Path(config.training.output_dir)
    before = snapshot(out)
    harmless = with_overrides(
        config, "logging.logging_steps=2", "training.save_steps=3", "training.save_total_limit=1",
        "training.eval_steps=1", "data.max_eval_examples=4", "training.resume=false",
        "model.gradient_checkpointing=true", "logging.tensorboard=true",
    )  # fmt: skip
    assert train(harmless) == json.loads(json.dumps(summary))
    assert snapshot(out) == before
    # a LoRA run does not read the sparselora section
    lora = run_config(tiny_dir, data_file, tmp_path / "lora", max_steps=1, method="lora")
    lora_summary = train(lora)
    again = train(with_overrides(lora, "sparselora.ffn_sparsity=0.25"))
    assert again == json.loads(json.dumps(lora_summary))


def test_an_edited_preset_file_is_a_different_run(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
):
    preset = tmp_path / "mine.yaml"
    SparseLoRAConfig(ffn_sparsity=0.5, attn_sparsity={1: 0.5}, calibration_tokens=1).save(preset)
    data = run_config(tiny_dir, data_file, tmp_path / "run", max_steps=1).to_dict()
    data["sparselora"] = {"preset": str(preset)}
    config = RunConfig.from_dict(data)
    summary = train(config)
    assert train(config) == json.loads(json.dumps(summary))  # run.yaml resolves to the same run
    SparseLoRAConfig(ffn_sparsity=0.25, attn_sparsity={1: 0.5}, calibration_tokens=1).save(preset)
    with pytest.raises(
        ValueError, match=r"sparselora\.ffn_sparsity: \{'all': 0\.5\} -> \{'all': 0\.25\}"
    ):
        train(config)


def test_overwrite_moves_the_old_run_aside(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "run"
    config = run_config(tiny_dir, data_file, out, max_steps=1, save_steps=1)
    train(config)
    before = snapshot(out)
    # training.resume=false would mix a fresh run into this one's folder: refused
    with pytest.raises(ValueError, match=r"training\.resume.*--overwrite"):
        train(with_overrides(config, "training.resume=false", "training.max_steps=2"))
    assert snapshot(out) == before

    changed = with_overrides(config, "lora.r=8")
    summary = train(changed, overwrite=True)
    aside = tmp_path / "run.replaced-1"
    assert snapshot(aside) == before  # moved whole, never deleted
    assert yaml.safe_load((out / "run.yaml").read_text())["lora"]["r"] == 8
    assert summary["steps"] == 1 and summary["resumed_from"] is None


def test_run_yaml_is_written_only_once_the_data_and_model_load(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "run"
    config = run_config(tiny_dir, data_file, out, max_steps=1)
    for override in ("data.train=/nonexistent/train.json", "model.name=/nonexistent/model"):
        with pytest.raises((OSError, ValueError)):
            train(with_overrides(config, override))
        assert not (out / "run.yaml").exists(), override


# -- case 4: a kill at any phase of a save ----------------------------------------------------

# One process imports the library once, then forks a child per phase; each child trains with
# SPARSELORA_TEST_KILL_AT=PHASE@2 and kills itself there. Prints {phase: signal that ended it}.
KILLER = f"""
import json, os, sys
import torch
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.train import train
children = {{}}
for phase, config in zip(sys.argv[1::2], sys.argv[2::2]):
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(2)
            os.environ["{KILL_AT}"] = phase + "@2"
            train(RunConfig.load(config))
        finally:
            os._exit(1)
    children[phase] = pid
ended = {{}}
for phase, pid in children.items():
    status = os.waitpid(pid, 0)[1]
    ended[phase] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
print(json.dumps(ended))
"""

# phase of the save at step 2 (save_total_limit=1) -> the checkpoint a re-run resumes from
KILLS = {"saved": "checkpoint-1", "marked": "checkpoint-2", "rotating": "checkpoint-2",
         "rotated": "checkpoint-2"}  # fmt: skip


def test_a_kill_at_any_phase_of_a_save_resumes_from_the_newest_complete_checkpoint(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
    request,
):
    argv = []
    for phase in KILLS:
        config = run_config(
            tiny_dir, data_file, tmp_path / phase, max_steps=4, save_steps=1, save_total_limit=1
        )
        config.save(tmp_path / f"{phase}.yaml")
        argv += [phase, str(tmp_path / f"{phase}.yaml")]
    killer = subprocess.Popen(
        [sys.executable, "-c", KILLER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reference = request.getfixturevalue("reference")  # trains meanwhile
    out, err = killer.communicate(timeout=600)
    assert killer.returncode == 0, err.decode()[-3000:]
    ended = json.loads(out.decode().splitlines()[-1])
    assert ended == {phase: signal.SIGKILL for phase in KILLS}, err.decode()[-3000:]
    for phase, expected in KILLS.items():
        run_dir = tmp_path / phase
        assert last_complete_checkpoint(run_dir).name == expected, phase
        resumed = train(RunConfig.load(tmp_path / f"{phase}.yaml"))
        assert resumed["resumed_from"].endswith(expected), phase
        assert curve(resumed) == curve(reference["summary"]), phase
        assert_same_adapter(adapter(run_dir), reference["adapter"])
        assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4"], phase


# -- case 5: totals span resumes --------------------------------------------------------------


def test_a_resumed_summary_counts_the_whole_run(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
    reference,
):
    config = run_config(tiny_dir, data_file, tmp_path / "run", max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[InterruptAt(3)])
    marker = json.loads((tmp_path / "run/checkpoint-2/sparselora_complete.json").read_text())
    first_part = marker["totals"]["train_seconds"]
    start = time.perf_counter()
    resumed = train(config)
    second_part = time.perf_counter() - start
    full = reference["summary"]
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["train_flops"] == full["train_flops"] > 0
    assert resumed["flops_saved"] == full["flops_saved"] > 0
    assert 0 < first_part < resumed["train_seconds"] < first_part + second_part
    assert resumed["median_step_seconds"] > 0
    wall = [p["wall_seconds"] for p in resumed["train_loss_curve"]]
    assert wall == sorted(wall) and wall[1] <= first_part < wall[2]


# -- case 6: a corrupt checkpoint is skipped --------------------------------------------------


def test_a_corrupt_checkpoint_is_skipped_with_a_warning(
    tiny_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
    reference,
    caplog,
):
    out = tmp_path / "run"
    config = run_config(tiny_dir, data_file, out, max_steps=4, save_steps=1, save_total_limit=3)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[InterruptAt(4)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"
    ]  # fmt: skip
    optimizer = out / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # truncated
    weights = out / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # same size, other bits
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="sparselora"):
        resumed = train(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint-3" in w and "optimizer.pt" in w for w in warnings), warnings
    assert any("checkpoint-2" in w and "adapter_model.safetensors" in w for w in warnings), warnings
    assert resumed["resumed_from"].endswith("checkpoint-1")
    assert (out / "checkpoint-3.corrupt").is_dir() and (out / "checkpoint-2.corrupt").is_dir()
    assert curve(resumed) == curve(reference["summary"])
    assert_same_adapter(adapter(out), reference["adapter"])
