"""benchmarks/compare_runs.py: training time excludes evaluations; same-step pairs match by
step number (runs of different lengths); same-time losses interpolate the first run's curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

compare_runs = load_benchmark("compare_runs")


def write_run(folder: Path, method: str, evals: list[tuple[int, float, float, float]]) -> Path:
    """evals: (step, eval_loss, wall_seconds at the evaluation's end, eval_runtime)."""
    folder.mkdir(parents=True)
    history = [{"step": 1, "loss": 2.0, "wall_seconds": 1.0}]
    history += [
        {"step": s, "eval_loss": loss, "wall_seconds": wall, "eval_runtime": runtime}
        for s, loss, wall, runtime in evals
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (folder / "summary.json").write_text(json.dumps({"method": method}))
    return folder


def test_eval_curve_subtracts_earlier_evaluations(tmp_path):
    run = write_run(tmp_path / "a", "lora", [(10, 1.0, 110.0, 10.0), (20, 0.8, 220.0, 10.0)])
    curve = compare_runs.eval_curve(run)
    # the first evaluation's 10 s is not training time for the second point
    assert [(p["step"], p["train_seconds"]) for p in curve] == [(10, 110.0), (20, 210.0)]


def test_against_matches_steps_by_number_and_interpolates_time():
    base = [
        {"step": 10, "eval_loss": 1.0, "train_seconds": 100.0},
        {"step": 20, "eval_loss": 0.8, "train_seconds": 200.0},
    ]
    other = [
        {"step": 10, "eval_loss": 0.95, "train_seconds": 150.0},
        {"step": 15, "eval_loss": 0.85, "train_seconds": 180.0},
        {"step": 20, "eval_loss": 0.84, "train_seconds": 250.0},
    ]
    rows = compare_runs.against(base, other)
    assert rows[0]["same_step"] == 1.0 and rows[0]["step_ratio"] == pytest.approx(0.95)
    assert rows[0]["same_time"] == pytest.approx(0.9)  # halfway from 1.0 to 0.8
    assert rows[1]["same_step"] is None and rows[1]["step_ratio"] is None
    assert rows[1]["time_ratio"] == pytest.approx(0.85 / 0.84)
    assert rows[2]["same_step"] == 0.8 and rows[2]["same_time"] is None  # past base's end


def test_labels_tell_runs_of_one_method_apart(tmp_path):
    lora = write_run(tmp_path / "x" / "lora", "lora", [])
    one = write_run(tmp_path / "x" / "sparselora", "sparselora", [])
    two = write_run(tmp_path / "y" / "sparselora", "sparselora", [])
    assert compare_runs.run_labels([lora, one]) == ["lora", "sparselora"]
    assert compare_runs.run_labels([lora, one, two]) == [
        "lora",
        "sparselora (x/sparselora)",
        "sparselora (y/sparselora)",
    ]
    with pytest.raises(ValueError, match="--labels"):
        compare_runs.run_labels([lora, one], ["only one"])
