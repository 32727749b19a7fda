"""The interleaved demo: two trainings take turns by blocks (A B B A ...), waits stay out of the
recorded times, neither run can deadlock the other, and the paired step time ratio heads the
table. Trainings are faked with sleeps, except one tiny real run against a fake partner."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparselora.recipes import demo
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.turns import TURNS_ENV, TurnTaking, turn_number
from tests.conftest import train_tiny_run


def fake_training(turns: TurnTaking, steps: int, step_seconds: float, log=None, delay=0.0):
    """Call `turns`' events as the Trainer does, for `steps` optimizer steps of `step_seconds`
    (a sleep) each; appends (role, step) to `log` as each step runs."""
    time.sleep(delay)
    state = SimpleNamespace(global_step=0, max_steps=steps)
    turns.on_train_begin(None, state, None)
    for _ in range(steps):
        turns.on_step_begin(None, state, None)
        if log is not None:
            log.append((turns.role, state.global_step))
        time.sleep(step_seconds)
        state.global_step += 1
        turns.on_step_end(None, state, None)
    turns.on_train_end(None, state, None)


def run_threads(*jobs, timeout: float = 20.0) -> None:
    """Run each (function, args, kwargs) in a thread; fail if any is still running at `timeout`."""
    threads = [threading.Thread(target=f, args=a, kwargs=k, daemon=True) for f, a, k in jobs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a turn-taking run is stuck (deadlock)"


def test_turn_numbers_alternate_the_pair_order():
    order = sorted((turn_number(r, b), "AB"[r]) for r in (0, 1) for b in range(4))
    assert "".join(who for _, who in order) == "ABBAABBA"


def test_two_runs_take_turns_by_blocks_a_b_b_a(tmp_path):
    log = []
    a, b = TurnTaking(tmp_path, 0, block=2), TurnTaking(tmp_path, 1, block=2)
    # B starts first: only the turns can make A's block go first.
    run_threads(
        (fake_training, (a, 5, 0.01), {"log": log, "delay": 0.1}),
        (fake_training, (b, 5, 0.01), {"log": log}),
    )
    assert log == [
        (0, 0), (0, 1),  # A block 0
        (1, 0), (1, 1), (1, 2), (1, 3),  # B blocks 0 and 1
        (0, 2), (0, 3), (0, 4),  # A blocks 1 and 2 (one step: the last)
        (1, 4),  # B block 2
    ]  # fmt: skip
    for turns in (a, b):
        assert [(x["first_step"], x["steps"]) for x in turns.blocks] == [(0, 2), (2, 2), (4, 1)]


def test_waiting_for_the_partner_is_left_out_of_the_block_times(tmp_path):
    fast, slow = TurnTaking(tmp_path, 0, block=1), TurnTaking(tmp_path, 1, block=1)
    run_threads(
        (fake_training, (fast, 3, 0.02), {}),
        (fake_training, (slow, 3, 0.25), {}),
    )
    # fast's block 1 comes after slow's blocks 0 and 1 (0.5 s), its end after slow's block 2.
    assert len(fast.blocks) == 3
    assert all(0.02 <= x["seconds"] < 0.15 for x in fast.blocks), fast.blocks
    assert fast.waited_seconds > 0.7
    assert all(x["seconds"] >= 0.25 for x in slow.blocks)


def test_a_partner_that_finishes_early_stops_the_waiting(tmp_path):
    long, short = TurnTaking(tmp_path, 0, block=1), TurnTaking(tmp_path, 1, block=1)
    # short plays turn 1 and ends; long's block 1 is turn 3, which only short's turn 2 leads to.
    run_threads(
        (fake_training, (long, 4, 0.01), {}),
        (fake_training, (short, 1, 0.01), {}),
        timeout=10,
    )
    assert len(long.blocks) == 4 and len(short.blocks) == 1


def _start_and_die(folder: str) -> None:
    TurnTaking(folder, 1, block=1)  # announces its pid
    os._exit(3)


def test_a_partner_that_dies_stops_the_waiting(tmp_path):
    # A forked partner that exits before it is ready; never reaped while we wait (a zombie, as
    # a failed run is until the demo polls it), so only its process state tells it is gone.
    partner = multiprocessing.get_context("fork").Process(target=_start_and_die, args=(tmp_path,))
    partner.start()
    try:
        survivor = TurnTaking(tmp_path, 0, block=1)
        run_threads((fake_training, (survivor, 3, 0.01), {}), timeout=10)
        assert len(survivor.blocks) == 3
    finally:
        partner.join()
    assert partner.exitcode == 3


def test_the_environment_names_the_folder_role_and_block(tmp_path):
    spec = {"folder": str(tmp_path), "role": 1, "block": 3}
    turns = TurnTaking.from_environment({TURNS_ENV: json.dumps(spec)})
    assert (turns.folder, turns.role, turns.block) == (tmp_path, 1, 3)
    assert (tmp_path / "pid-1").read_text() == str(os.getpid())
    assert TurnTaking.from_environment({}) is None
    with pytest.raises(ValueError, match=TURNS_ENV):
        TurnTaking.from_environment({TURNS_ENV: json.dumps({**spec, "role": 2})})


def test_a_training_run_takes_its_turns_and_leaves_the_waits_out(tmp_path, monkeypatch):
    folder = tmp_path / "turns"
    folder.mkdir()
    monkeypatch.setenv(TURNS_ENV, json.dumps({"folder": str(folder), "role": 0, "block": 1}))
    partner = TurnTaking(folder, 1, block=1)
    thread = threading.Thread(target=fake_training, args=(partner, 2, 1.0), daemon=True)
    thread.start()
    # The run's step 1 (turn 3) waits for the partner's two 1-second blocks (turns 1 and 2).
    run = train_tiny_run(tmp_path, 1, 16, "data.eval=null", "training.save_steps=0")
    thread.join(10)
    assert not thread.is_alive()
    summary = json.loads((run / "summary.json").read_text())
    blocks = summary["interleaved_blocks"]
    assert [(x["first_step"], x["steps"]) for x in blocks] == [(0, 1), (1, 1)]
    assert all(x["seconds"] < 1.0 for x in blocks), blocks
    assert summary["median_step_seconds"] < 1.0
    assert summary["train_seconds"] < 2.0
    assert len(partner.blocks) == 2


def blocks(seconds: list[float], steps: list[int]) -> list[dict]:
    first = [sum(steps[:i]) for i in range(len(steps))]
    return [
        {"first_step": f, "steps": n, "seconds": s}
        for f, n, s in zip(first, steps, seconds, strict=True)
    ]


# Per-step LoRA 2 s everywhere; SparseLoRA 1, 1.6, 2, 0.8, 1.25 s (the last block: one step).
LORA = blocks([4.0, 4.0, 4.0, 4.0, 2.0], [2, 2, 2, 2, 1])
SPARSE = blocks([2.0, 3.2, 4.0, 1.6, 1.25], [2, 2, 2, 2, 1])


def test_paired_ratio_median_and_spread_over_pairs():
    pairs = demo.paired_ratio(LORA, SPARSE, dense_steps=set())
    assert pairs.ratios == pytest.approx([2.0, 1.25, 1.0, 2.5, 1.6])
    assert pairs.summary() == pytest.approx(
        {"median": 1.6, "q1": 1.25, "q3": 2.0, "low": 1.0, "high": 2.5}
    )
    assert pairs.warmup_ratios == []


def test_pairs_holding_dense_sparselora_steps_are_left_out():
    pairs = demo.paired_ratio(LORA, SPARSE, dense_steps={1})  # in block 0 (steps 0-1)
    assert pairs.ratios == pytest.approx([1.25, 1.0, 2.5, 1.6])
    assert pairs.warmup_ratios == pytest.approx([2.0])
    assert pairs.summary()["median"] == pytest.approx(1.425)
    assert pairs.sparse_step_seconds == pytest.approx([1.6, 2.0, 0.8, 1.25])
    with pytest.raises(ValueError, match="cannot be paired"):
        demo.paired_ratio(LORA, SPARSE[:-1], dense_steps=set())


def test_dense_steps_follow_the_runs_schedule(tmp_path):
    overrides = ["sparselora.start_step=0.25", "sparselora.end_step=0.75"]
    RunConfig.load(None, overrides).save(tmp_path / "run.yaml")
    assert demo.schedule_dense_steps(tmp_path, 8) == {0, 1, 6, 7}


def test_the_comparison_opens_with_the_paired_interleaved_ratio(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    (root / "sparselora").mkdir(parents=True)
    RunConfig.load(None, ["sparselora.start_step=0.1"]).save(root / "sparselora" / "run.yaml")
    summary = {"median_step_seconds": 2.0, "tokens_per_second": 100.0, "eval_loss": 1.0}
    rows = {
        "lora": {**summary, "method": "lora", "interleaved_blocks": LORA},
        "sparselora": {**summary, "method": "sparselora", "interleaved_blocks": SPARSE},
    }
    monkeypatch.setattr(demo, "train_both", lambda root, args, progress: rows)
    monkeypatch.setattr(demo, "evaluate_run", lambda *a, **k: {"accuracy": 0.5})
    monkeypatch.setattr(demo, "plot_losses", lambda *a: None)
    # 9 steps, start_step 0.1: step 0 dense, so block 0 is left out.
    comparison = demo.run_demo(demo.DemoConfig(out=str(root), steps=9, block=2))
    header, table, note = comparison.split("\n\n")
    assert "blocks of 2 step(s), 4 pairs" in header
    lines = table.splitlines()
    assert lines[2] == (
        "| step time, interleaved (paired median lora/sparse) | 2.00 | 1.43 "
        "| 1.425 (IQR 1.188-1.825, min-max 1.000-2.500) |"
    )
    assert lines[3].startswith("| median step time (s) | 2.00 | 2.00 | 1.000")
    assert "Left out: 1 pair(s)" in note and "median ratio 2.000" in note
    assert (root / "comparison.md").read_text() == comparison + "\n"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failed_training_stops_the_other_and_says_which(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    commands = {
        "lora": python(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                       "time.sleep(60)"),
        "sparselora": python("import sys, time; time.sleep(0.5); print('out of memory'); "
                             "sys.exit(3)"),
    }  # fmt: skip
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    start = time.monotonic()
    with pytest.raises(ChildProcessError) as error:
        demo.run_together(commands, {n: dict(os.environ) for n in commands}, logs)
    assert time.monotonic() - start < 20
    message = str(error.value)
    assert "training sparselora failed (exit status 3)" in message
    assert "stopped the others (lora)" in message and "out of memory" in message
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_trainings_that_succeed_all_run_to_their_end(tmp_path):
    commands = {name: python(f"print('{name} done')") for name in ("lora", "sparselora")}
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    ticks = []
    demo.run_together(
        commands, {n: dict(os.environ) for n in commands}, logs, tick=lambda: ticks.append(1)
    )
    for name in commands:
        assert Path(logs[name]).read_text() == f"{name} done\n"
    assert ticks


def test_each_training_gets_its_role_in_one_shared_turn_folder(tmp_path, monkeypatch):
    seen = {}

    def fake_run_together(commands, envs, logs, tick):
        for name, command in commands.items():
            seen[name] = (command, json.loads(envs[name][TURNS_ENV]))
            run = tmp_path / name
            run.mkdir()
            (run / "summary.json").write_text(json.dumps({"method": name}))

    monkeypatch.setattr(demo, "run_together", fake_run_together)
    rows = demo.train_both(tmp_path, demo.DemoConfig(block=3))
    assert rows == {"lora": {"method": "lora"}, "sparselora": {"method": "sparselora"}}
    (lora_command, lora), (sparse_command, sparse) = seen["lora"], seen["sparselora"]
    assert (lora["role"], sparse["role"], lora["block"], sparse["block"]) == (0, 1, 3, 3)
    assert lora["folder"] == sparse["folder"] and Path(lora["folder"]).parent == tmp_path
    assert lora_command[3:5] == ["train", "--overwrite"]
    assert "training.method=sparselora" in sparse_command


def test_sigterm_stops_the_trainings_and_removes_the_turn_folder(tmp_path):
    """`kill` on the demo (SIGTERM, not Ctrl-C): its trainings are killed and reaped, the
    `.turns-*` folder is removed, and the demo exits with 143."""
    pid_file = tmp_path / "training.pid"
    script = f"""
import os, sys
from pathlib import Path
from sparselora.recipes import demo
sleeper = ("import os, time; open({str(pid_file)!r} + '.' + os.environ['NAME'], 'w')"
           ".write(str(os.getpid())); time.sleep(60)")
def command(method, root, args):
    os.environ["NAME"] = method
    return [sys.executable, "-c", sleeper]
demo.train_command = command
demo.train_both(Path({str(tmp_path)!r}), demo.DemoConfig())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    pids = [Path(f"{pid_file}.{method}") for method in ("lora", "sparselora")]
    deadline = time.monotonic() + 30
    while not all(p.exists() and p.read_text() for p in pids):
        assert time.monotonic() < deadline and parent.poll() is None, "trainings did not start"
        time.sleep(0.05)
    assert list(tmp_path.glob(".turns-*"))  # the turn folder exists while they run
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=20) == 143
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(int(pid.read_text()), 0)
    assert not list(tmp_path.glob(".turns-*"))
