"""The run folder of `sparselora train`: which run it holds, what a re-run may do with it, and
checkpoints that survive a kill at any moment. Nothing here deletes a result; what is replaced
is moved aside.

What a re-run into RUN_DIR does (`RunFolder.plan`):

- RUN_DIR holds no progress (no complete checkpoint, no adapter/, no summary.json): it trains.
- RUN_DIR holds a run whose run.yaml differs in a key that changes the result: RunFolderError,
  before anything loads, listing `key: old -> new` and the two ways out: a new
  `training.output_dir`, or `overwrite=True` (`sparselora train --overwrite`), which moves the
  whole run folder aside to RUN_DIR.replaced-K (K = 1, 2, ...) and trains afresh.
- The run is finished (summary.json and adapter/ written) with the same number of steps: it is
  reported finished, its summary is returned, and nothing in RUN_DIR is touched (also with
  `training.resume=false`: training again would repeat the same run).
- `training.max_steps` (or `training.epochs`) grew: the run continues from its newest complete
  checkpoint to the new total. The learning-rate and SparseLoRA step schedules are recomputed
  for the new total, so the result differs from a run trained to that total from the start. A
  finished run's result (adapter/, summary.json, loss.png, eval.json, eval_history.jsonl,
  predictions/, merged/, trainer_state.json, with a copy of its run.yaml) is first moved to
  RUN_DIR/finished-step-N/, itself a run folder `sparselora eval` reads. A smaller total is refused (RunFolderError).
- Otherwise, with `training.resume=true`, it resumes from the newest complete checkpoint that
  passes its check (`checkpoint_problem`); each newer one that fails is logged (WARNING, with
  why) and moved aside to checkpoint-N.corrupt. With `training.resume=false` it is refused: a
  fresh start would mix two runs in one folder.

Keys that may differ between the recorded run.yaml and the re-run (RESULT_FREE_KEYS): they
change what is measured, logged or kept, not the adapter:
model.gradient_checkpointing (recomputes the same activations), data.eval, data.task,
data.max_eval_examples, training.output_dir, training.save_steps, training.save_total_limit,
training.eval_steps, training.resume, logging.*. Every other key changes the result: model.*,
lora.*, data.train / max_length / prompt_max_length / template / padding_side /
max_train_examples, training.method / batch_size / gradient_accumulation / learning_rate /
lr_scheduler / warmup_ratio / weight_decay / seed, and for SparseLoRA runs every resolved
SparseLoRAConfig field (a preset file is read, so an edited preset file is a different run; a
LoRA run ignores the sparselora section). A key not listed here, such as one added to RunConfig
later, changes the result until it is listed. `training.max_steps` and `training.epochs` are
compared through the total number of optimizer steps they give (`total_steps`).

A checkpoint is saved as: the Trainer's files; then COMPLETE_MARKER, written atomically after
every file is flushed to disk, holding the size and sha256 of each file and the run's totals so
far (`CheckpointTotals`); then rotation (`rotate_checkpoints`), which deletes a checkpoint only
once a newer one is complete, removing its marker first. A kill at any point leaves the newest
complete checkpoint intact.

Test aid: with the environment variable SPARSELORA_TEST_KILL_AT=PHASE@STEP the process kills
itself (SIGKILL) at that phase of the save at optimizer step STEP; PHASE is one of KILL_PHASES:
`saved` (files written, no marker), `marked` (marker written, before rotation), `rotating` (an old
checkpoint's marker removed, its files not yet), `rotated` (after rotation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparselora.config import ConfigError, dump_yaml
from sparselora.recipes.run_config import RunConfig, TrainingSection
from sparselora.version import __version__

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "sparselora_complete.json"
KILL_AT_ENV = "SPARSELORA_TEST_KILL_AT"
KILL_PHASES = ("saved", "marked", "rotating", "rotated")
RESULT_FREE_KEYS = frozenset(
    {
        "model.gradient_checkpointing",
        "data.eval",
        "data.task",
        "data.max_eval_examples",
        "training.output_dir",
        "training.save_steps",
        "training.save_total_limit",
        "training.eval_steps",
        "training.resume",
        "logging.logging_steps",
        "logging.tensorboard",
    }
)
LENGTH_KEYS = ("training.max_steps", "training.epochs")
# What a finished run wrote beside its checkpoints; kept together when the run is continued.
FINAL_OUTPUTS = ("adapter", "summary.json", "loss.png", "eval.json", "eval_history.jsonl",
                 "predictions", "merged", "trainer_state.json")  # fmt: skip
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class RunFolderError(ValueError):
    """The run folder cannot take this run as asked; the message says why and the ways out."""


@dataclass
class CheckpointTotals:
    """The run's totals up to a checkpoint, so that a resumed run's summary covers it all."""

    train_flops: float = 0.0
    flops_saved: float = 0.0
    dense_steps: int = 0  # forwards run dense because the estimator was not ready
    train_seconds: float = 0.0
    step_times: list[float] = field(default_factory=list)


# -- what a run changes -------------------------------------------------------------------------


def result_keys(config: RunConfig) -> dict[str, Any]:
    """Flat `section.key` -> value of every key that can change the trained adapter (length keys
    included); the sparselora section resolved (a preset file read), less its `preset` name."""
    data = config.to_dict()
    data["sparselora"] = config.sparse_config().to_dict()
    data["sparselora"].pop("preset", None)
    flat = {
        f"{name}.{key}": value for name, section in data.items() for key, value in section.items()
    }
    return {key: value for key, value in flat.items() if key not in RESULT_FREE_KEYS}


def result_differences(old: RunConfig, new: RunConfig, lengths: bool = False) -> list[str]:
    """'key: old -> new' for each key that differs and changes the result: all but the length
    keys, or only those (`lengths`). The sparselora section counts only when both runs are
    SparseLoRA runs."""
    before, after = result_keys(old), result_keys(new)
    both_sparse = old.training.method == new.training.method == "sparselora"
    out = []
    for key in {**before, **after}:
        if (key in LENGTH_KEYS) != lengths or (key.startswith("sparselora.") and not both_sparse):
            continue
        if before.get(key) != after.get(key):
            out.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return out


def total_steps(training: TrainingSection, examples: int, world_size: int = 1) -> int:
    """Optimizer steps of the whole run as the HF Trainer counts them: `max_steps`, or else
    `epochs` x updates per epoch (micro-batches per process over gradient accumulation, >= 1)."""
    if training.max_steps > 0:
        return training.max_steps
    batches = math.ceil(math.ceil(examples / training.batch_size) / world_size)
    per_epoch = max(math.ceil(batches / training.gradient_accumulation), 1)
    return math.ceil(training.epochs * per_epoch)


def write_run_config(path: Path, config: RunConfig) -> None:
    """run.yaml (atomically) with the sparselora section resolved, so that it keeps describing
    the adapter when a preset file changes later (the preset's name stays, as provenance)."""
    data = config.to_dict()
    data["sparselora"] = config.sparse_config().to_dict()
    resolved = RunConfig.from_dict(data)  # the same run, checked once more
    atomic_write(path, dump_yaml(resolved.to_dict()))


# -- the folder as a whole ----------------------------------------------------------------------


@dataclass
class Plan:
    """What `train` does with the run folder: 'train' (nothing there), 'replace' (move the old
    run aside first), 'finished' (nothing to do), 'resume', or 'continue' (a finished run to a
    larger total; its result is kept in finished-step-N first)."""

    action: str
    total_steps: int
    finished_steps: int | None = None


class RunFolder:
    """What a run folder holds, read once; `check` and `plan` decide, and write nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished = (path / "summary.json").is_file() and (path / "adapter").is_dir()
        self.progress = (
            (path / "summary.json").exists()
            or (path / "adapter").exists()
            or bool(complete_checkpoints(path))
        )

    def check(self, config: RunConfig, overwrite: bool) -> None:
        """Refuse, before anything loads, a folder that holds progress of a different run."""
        if overwrite or not self.progress:
            return
        differences = result_differences(self.recorded(), config)
        if differences:
            raise RunFolderError(
                f"{self.path} holds a different run ({'; '.join(differences)}); {self.ways_out()}"
            )

    def plan(self, config: RunConfig, examples: int, world_size: int, overwrite: bool) -> Plan:
        """The action for `config` (already `check`ed), given the training set's size."""
        after = total_steps(config.training, examples, world_size)
        if not self.progress:
            return Plan("train", after)
        if overwrite:
            return Plan("replace", after)
        recorded = self.recorded()
        before = total_steps(recorded.training, examples, world_size)
        if after < before:
            changed = "; ".join(result_differences(recorded, config, lengths=True))
            raise RunFolderError(
                f"{self.path} holds a run of {before} steps; {changed} gives {after}, a different "
                f"schedule (only a larger total continues a run); {self.ways_out()}"
            )
        if self.finished and after == before:
            return Plan("finished", after)
        if not config.training.resume:
            raise RunFolderError(
                f"training.resume is false but {self.path} holds progress of this run (a fresh "
                f"start would mix two runs in one folder); set training.resume=true to continue "
                f"it, or {self.ways_out()}"
            )
        if after > before:
            logger.warning(
                "%s: the run grows from %d to %d steps and continues from its newest checkpoint; "
                "the learning-rate and SparseLoRA schedules are recomputed for %d steps",
                self.path, before, after, after,
            )  # fmt: skip
        if self.finished:
            return Plan("continue", after, finished_steps=self.summary()["steps"])
        return Plan("resume", after)

    def prepare(self, plan: Plan, config: RunConfig, failed: list[Path]) -> None:
        """Carry out `plan` once everything has loaded: move a replaced run aside, keep a
        continued run's finished result, clear the checkpoints a resume must not see
        (`failed`, from `find_resume`), and write run.yaml. Main process only."""
        if plan.action == "replace":
            move_aside(self.path)
        if plan.action == "continue":
            keep_finished_result(self.path, plan.finished_steps)
        self.path.mkdir(parents=True, exist_ok=True)
        clear_for_resume(self.path, failed)
        write_run_config(self.path / "run.yaml", config)

    def recorded(self) -> RunConfig:
        path = self.path / "run.yaml"
        if not path.exists():
            raise RunFolderError(
                f"{self.path} holds checkpoints or an adapter but no run.yaml, so what they are "
                f"is unknown; {self.ways_out()}"
            )
        try:
            return RunConfig.load(path)
        except ConfigError as err:
            raise RunFolderError(f"{path} cannot be read ({err}); {self.ways_out()}") from None

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def ways_out(self) -> str:
        return (
            f"use a new training.output_dir, or pass --overwrite (train(..., overwrite=True)), "
            f"which moves this run to {_free_name(self.path, '.replaced-')}"
        )


def move_aside(run_dir: Path) -> Path:
    """Rename the run folder to RUN_DIR.replaced-K (the first free K) and start an empty one."""
    target = _free_name(run_dir, ".replaced-")
    os.rename(run_dir, target)
    run_dir.mkdir(parents=True)
    logger.warning("moved the previous run in %s to %s", run_dir, target)
    return target


def keep_finished_result(run_dir: Path, steps: int) -> Path:
    """Move a finished run's outputs, with a copy of its run.yaml, to RUN_DIR/finished-step-N."""
    target = run_dir / f"finished-step-{steps}"
    if target.exists():
        target = _free_name(target, "-")
    target.mkdir()
    shutil.copy2(run_dir / "run.yaml", target / "run.yaml")
    for name in FINAL_OUTPUTS:
        if (run_dir / name).exists():
            os.rename(run_dir / name, target / name)
    logger.info("kept the finished %d-step result in %s", steps, target)
    return target


def _free_name(path: Path, separator: str) -> Path:
    """PATH{separator}K for the first K >= 1 that does not exist."""
    path = path if path.name else path.resolve()  # "." has no name to extend
    k = 1
    while path.with_name(f"{path.name}{separator}{k}").exists():
        k += 1
    return path.with_name(f"{path.name}{separator}{k}")


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint-N folder, complete or not, by step."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        match = _CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints whose save finished (marker present), by step."""
    return [(step, path) for step, path in checkpoint_folders(run_dir) if is_complete(path)]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished (it may still fail `checkpoint_problem`)."""
    complete = complete_checkpoints(run_dir)
    return complete[-1][1] if complete else None


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def mark_complete(folder: Path, step: int, totals: CheckpointTotals) -> None:
    """Flush every file of the checkpoint to disk, then write the marker (atomically) with each
    file's size and sha256 and the run's totals up to this step."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(COMPLETE_MARKER):
            files[path.relative_to(folder).as_posix()] = _digest(path, flush=True)
    _fsync_dir(folder)
    marker = {"step": step, "time": time.time(), "version": __version__,
              "totals": asdict(totals), "files": files}  # fmt: skip
    atomic_write(folder / COMPLETE_MARKER, json.dumps(marker))


def unmark(folder: Path) -> None:
    """Make a checkpoint folder incomplete (before it is rewritten or deleted)."""
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)


def checkpoint_totals(folder: Path) -> CheckpointTotals | None:
    """The totals recorded with a complete checkpoint (None for a marker without them)."""
    totals = json.loads((folder / COMPLETE_MARKER).read_text()).get("totals")
    return CheckpointTotals(**totals) if totals is not None else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (a file missing, of another size or
    content than when it was saved), or None. A marker that records no files (written before
    files were recorded) is trusted."""
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text()).get("files")
    except (OSError, ValueError) as err:
        return f"{COMPLETE_MARKER} cannot be read ({err})"
    for name, saved in (files or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != saved["size"]:
            return f"{name} has {size} bytes, {saved['size']} when saved"
        if _digest(path)["sha256"] != saved["sha256"]:
            return f"{name} has other contents than when saved (sha256 differs)"
    return None


def find_resume(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint that passes `checkpoint_problem`, and the newer complete
    ones that failed it (each logged with why). Reads only."""
    failed = []
    for _, path in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, failed
        logger.warning("skipping %s: %s; trying the checkpoint before it", path, problem)
        failed.append(path)
    if failed:
        logger.warning("no checkpoint in %s passed its check; training from step 0", run_dir)
    return None, failed


def clear_for_resume(run_dir: Path, failed: list[Path]) -> None:
    """Move the checkpoints that failed their check aside (checkpoint-N.corrupt), and delete the
    unfinished ones (no marker: nothing in them can be resumed), so that no stale folder is
    mistaken for one the resumed run writes."""
    for path in failed:
        target = path.with_name(path.name + ".corrupt")
        if target.exists():
            target = _free_name(target, "-")
        os.rename(path, target)
        logger.warning("moved %s to %s", path.name, target.name)
    for _, path in checkpoint_folders(run_dir):
        if not is_complete(path):
            shutil.rmtree(path)


def rotate_checkpoints(run_dir: Path, keep: int | None, step: int) -> None:
    """After the checkpoint of `step` is complete: delete the complete checkpoints beyond the
    newest `keep` (None or <= 0: keep all), never the newest, and the unfinished ones older than
    the newest complete one. The marker goes first, so a kill midway leaves an unfinished folder
    (ignored, and deleted by the next rotation), never a complete-looking part."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return
    doomed = [path for _, path in complete[:-keep]] if keep and keep > 0 else []
    newest = complete[-1][0]
    doomed += [
        path for s, path in checkpoint_folders(run_dir) if s < newest and not is_complete(path)
    ]
    for path in doomed:
        unmark(path)
        kill_point("rotating", step)
        shutil.rmtree(path)


def kill_point(phase: str, step: int) -> None:
    """Test aid: SIGKILL this process if SPARSELORA_TEST_KILL_AT is `phase@step`."""
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name not in KILL_PHASES or not at.isdigit():
        raise ValueError(
            f"{KILL_AT_ENV}={wanted!r} must look like PHASE@STEP with PHASE one of {KILL_PHASES}"
        )
    if name == phase and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# -- files --------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _digest(path: Path, flush: bool = False) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        if flush:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
