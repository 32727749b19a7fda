"""The main job (`make demo`): LoRA vs SparseLoRA on the embedded SmolLM2-135M and GSM8K.

Both runs use the same seed, data, steps and LoRA settings; each trains in its own process
(`sparselora train`), so its peak memory is its own. The two processes start together and take
turns by blocks of `block` optimizer steps, in the order LoRA SparseLoRA SparseLoRA LoRA ...
(sparselora.recipes.turns): both runs see the same machine conditions, so a neighbour process
that starts halfway slows both alike. Block i of LoRA and block i of SparseLoRA form a pair; the
headline is the median over pairs of the per-step time ratio LoRA / SparseLoRA, with its
interquartile range and min-max. Pairs whose SparseLoRA block holds dense steps of its schedule
(the `start_step` warm-up, or after `end_step`) are left out of that ratio and reported apart.

Then both adapters are evaluated (dense) on the same held-out problems and a side-by-side table
is written to RUN_ROOT/comparison.md. Each training's output goes to RUN_ROOT/train-METHOD.log.

    sparselora demo --steps 24 --block 2 --out runs/demo
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sparselora.config import check_int, doc
from sparselora.engine.schedule import SparseSchedule
from sparselora.recipes.commands import evaluate_run
from sparselora.recipes.loading import METHODS
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.train import plot_losses
from sparselora.recipes.turns import TURNS_ENV, turns_taken

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1


@dataclass
class DemoConfig:
    """What `sparselora demo` runs; validated on construction."""

    out: str = field(default="runs/demo", metadata=doc("Run root folder."))
    steps: int = field(default=24, metadata=doc("Optimizer steps per method."))
    batch_size: int = field(default=4, metadata=doc("Micro-batch size."))
    max_length: int = field(default=320, metadata=doc("Tokens per example after truncation."))
    eval_examples: int = field(default=48, metadata=doc("Held-out problems for the loss."))
    accuracy_examples: int = field(
        default=16, metadata=doc("Held-out problems answered by greedy generation.")
    )
    max_new_tokens: int = field(default=192, metadata=doc("Generated tokens per answer."))
    seed: int = field(default=42, metadata=doc("Seed of both runs."))
    block: int = field(
        default=2,
        metadata=doc(
            "Optimizer steps per turn: the two trainings alternate blocks of this many steps "
            "(LoRA, SparseLoRA, SparseLoRA, LoRA, ...); the step time ratio pairs their blocks."
        ),
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_examples", "accuracy_examples",
                     "max_new_tokens", "block"):  # fmt: skip
            check_int(name, getattr(self, name), minimum=1)


def train_command(method: str, root: Path, args: DemoConfig) -> list[str]:
    """The `sparselora train` command line of one method, into ROOT/METHOD.

    Every demo trains afresh: an earlier demo run in ROOT/METHOD is moved aside to
    ROOT/METHOD.replaced-K (`train --overwrite`), never deleted."""
    overrides = [
        f"training.method={method}",
        f"training.output_dir={root / method}",
        f"training.max_steps={args.steps}",
        f"training.batch_size={args.batch_size}",
        "training.save_steps=0",
        "training.resume=false",
        f"training.seed={args.seed}",
        f"data.max_length={args.max_length}",
        f"data.max_eval_examples={args.eval_examples}",
        f"logging.logging_steps={max(1, args.steps // 12)}",
    ]
    return [sys.executable, "-m", "sparselora.cli", "train", "--overwrite", *overrides]


def train_both(root: Path, args: DemoConfig, progress: bool = False) -> dict[str, dict]:
    """Train every method at once, taking turns by blocks; returns each run's summary.json.

    Raises ChildProcessError when a training fails (the others are stopped)."""
    root.mkdir(parents=True, exist_ok=True)
    total_turns = len(METHODS) * math.ceil(args.steps / args.block)
    with sigterm_unwinds(), tempfile.TemporaryDirectory(prefix=".turns-", dir=root) as folder:
        commands, envs, logs = {}, {}, {}
        for role, method in enumerate(METHODS):
            commands[method] = train_command(method, root, args)
            turns = {"folder": folder, "role": role, "block": args.block}
            envs[method] = {**os.environ, TURNS_ENV: json.dumps(turns)}
            logs[method] = root / f"train-{method}.log"
            logger.info("training %s: sparselora %s", method, " ".join(commands[method][3:]))
        logger.info(
            "the trainings take turns by blocks of %d steps; their output: %s",
            args.block, ", ".join(str(p) for p in logs.values()),
        )  # fmt: skip
        with tqdm(total=total_turns, desc="interleaved blocks", disable=not progress) as bar:

            def tick() -> None:
                taken = turns_taken(folder)
                if taken > bar.n:  # redraw only on progress: a piped log stays short
                    bar.update(taken - bar.n)

            run_together(commands, envs, logs, tick)
    return {m: json.loads((root / m / "summary.json").read_text()) for m in METHODS}


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM (`kill`, a job scheduler) raises SystemExit(143) instead of
    ending the process at once, so `finally` blocks run: the trainings are stopped and the turn
    folder removed, as on Ctrl-C. Only the main thread can take signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_together(
    commands: dict[str, list[str]],
    envs: dict[str, dict[str, str]],
    logs: dict[str, Path],
    tick: Callable[[], None] | None = None,
) -> None:
    """Run the named commands at once, each writing its output to its log file, until all have
    exited; `tick()` is called every POLL_SECONDS. When one fails, the others are killed and a
    ChildProcessError names it, its exit status and the end of its log."""
    running = {}
    try:
        for name, command in commands.items():
            with open(logs[name], "w") as log:
                running[name] = subprocess.Popen(
                    command, env=envs[name], stdout=log, stderr=subprocess.STDOUT
                )
        while running:
            time.sleep(POLL_SECONDS)
            if tick is not None:
                tick()
            for name, process in list(running.items()):
                status = process.poll()
                if status is None:
                    continue
                del running[name]
                if status != 0:
                    tail = "\n".join(logs[name].read_text(errors="replace").splitlines()[-20:])
                    stopped = ", ".join(running) or "none"
                    raise ChildProcessError(
                        f"training {name} failed (exit status {status}); stopped the others "
                        f"({stopped}). The end of {logs[name]}:\n{tail}"
                    )
    finally:
        for process in running.values():
            process.kill()
            process.wait()


@dataclass
class PairedRatio:
    """Per-step time ratios LoRA / SparseLoRA of paired blocks (block i of each run)."""

    ratios: list[float]  # the pairs in the headline
    lora_step_seconds: list[float]  # per-step time of those pairs' blocks
    sparse_step_seconds: list[float]
    warmup_ratios: list[float]  # pairs left out: the SparseLoRA block holds dense steps

    def summary(self) -> dict[str, float] | None:
        """median, q1, q3 (interquartile range), low, high of `ratios`; None without pairs."""
        if not self.ratios:
            return None
        q1, _, q3 = (
            statistics.quantiles(self.ratios, n=4, method="inclusive")
            if len(self.ratios) > 1
            else self.ratios * 3
        )
        return {
            "median": statistics.median(self.ratios),
            "q1": q1,
            "q3": q3,
            "low": min(self.ratios),
            "high": max(self.ratios),
        }


def paired_ratio(lora_blocks: list[dict], sparse_blocks: list[dict], dense_steps) -> PairedRatio:
    """Pair block i of LoRA with block i of SparseLoRA (each {"first_step", "steps",
    "seconds"}, as sparselora.recipes.turns records them) and take the ratio of their per-step
    times, lora / sparse. Pairs whose SparseLoRA block holds a step in `dense_steps` (0-based)
    go to `warmup_ratios` instead of `ratios`."""
    if [(b["first_step"], b["steps"]) for b in lora_blocks] != [
        (b["first_step"], b["steps"]) for b in sparse_blocks
    ]:
        raise ValueError("the two runs' blocks cover different steps: they cannot be paired")
    result = PairedRatio([], [], [], [])
    for lora, sparse in zip(lora_blocks, sparse_blocks, strict=True):
        lora_step = lora["seconds"] / lora["steps"]
        sparse_step = sparse["seconds"] / sparse["steps"]
        steps = range(sparse["first_step"], sparse["first_step"] + sparse["steps"])
        if any(step in dense_steps for step in steps):
            result.warmup_ratios.append(lora_step / sparse_step)
            continue
        result.ratios.append(lora_step / sparse_step)
        result.lora_step_seconds.append(lora_step)
        result.sparse_step_seconds.append(sparse_step)
    return result


def schedule_dense_steps(run_dir: Path, steps: int) -> set[int]:
    """The 0-based optimizer steps that a SparseLoRA run's schedule runs dense (its run.yaml's
    start_step warm-up and the steps from end_step on)."""
    config = RunConfig.load(run_dir / "run.yaml").sparse_config()
    schedule = SparseSchedule(steps, config.start_step, config.end_step)
    return {step for step in range(steps) if not schedule.is_sparse(step)}


def comparison_table(rows: dict[str, dict], pairs: PairedRatio) -> str:
    """The markdown table: the paired interleaved step time ratio first, then each run's
    figures (LoRA, SparseLoRA, ratio)."""

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| | LoRA | SparseLoRA | ratio |",
        "|---|---|---|---|",
    ]
    spread = pairs.summary()
    if spread is None:
        lines.append("| step time, interleaved (paired median lora/sparse) | n/a | n/a | |")
    else:
        lines.append(
            "| step time, interleaved (paired median lora/sparse) "
            f"| {statistics.median(pairs.lora_step_seconds):.2f} "
            f"| {statistics.median(pairs.sparse_step_seconds):.2f} "
            f"| {spread['median']:.3f} (IQR {spread['q1']:.3f}-{spread['q3']:.3f}, "
            f"min-max {spread['low']:.3f}-{spread['high']:.3f}) |"
        )
    specs = [
        ("median step time (s)", "median_step_seconds", ".2f", "lora/sparse"),
        ("tokens / s", "tokens_per_second", ".0f", "sparse/lora"),
        ("training TFLOPs", "train_flops", ".2f", "lora/sparse"),
        ("peak training memory (MiB)", "peak_memory_mb", ".0f", "sparse/lora"),
        ("held-out loss", "eval_loss", ".4f", "sparse/lora"),
        ("held-out accuracy", "accuracy", ".3f", ""),
    ]
    lora, sparse = rows["lora"], rows["sparselora"]
    for title, key, spec, ratio in specs:
        a, b = lora.get(key), sparse.get(key)
        if key == "train_flops":
            a, b = (None if a is None else a / 1e12), (None if b is None else b / 1e12)
        if ratio and a and b:
            value = a / b if ratio == "lora/sparse" else b / a
            ratio_text = f"{value:.3f} ({ratio})"
        else:
            ratio_text = ""
        lines.append(f"| {title} | {fmt(a, spec)} | {fmt(b, spec)} | {ratio_text} |")
    return "\n".join(lines)


def interleaving_note(pairs: PairedRatio, block: int) -> str:
    """The footnote under the table: how the interleaved row was measured."""
    note = (
        f"Interleaved: the two trainings took turns by blocks of {block} step(s) (LoRA, "
        "SparseLoRA, SparseLoRA, LoRA, ...); each pair is block i of both runs, its ratio the "
        "LoRA / SparseLoRA time per step (step times only, waits for the other run left out); "
        f"median, IQR and min-max over {len(pairs.ratios)} pair(s)."
    )
    if pairs.warmup_ratios:
        note += (
            f" Left out: {len(pairs.warmup_ratios)} pair(s) whose SparseLoRA block holds dense "
            "steps of its schedule (start_step warm-up or after end_step), median ratio "
            f"{statistics.median(pairs.warmup_ratios):.3f}."
        )
    return note


def run_demo(args: DemoConfig, progress: bool = False) -> str:
    """Train both methods interleaved, evaluate both adapters, write RUN_ROOT/comparison.md and
    loss.png. `progress` shows a progress bar of the interleaved blocks.

    Returns the comparison (a header line, a markdown table and its footnote).
    """
    root = Path(args.out)
    start = time.perf_counter()
    rows = train_both(root, args, progress)
    for method, row in rows.items():
        logger.info("evaluating %s on %d held-out problems", method, args.accuracy_examples)
        result = evaluate_run(
            root / method,
            limit=args.accuracy_examples,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.accuracy_examples,
        )
        row["accuracy"] = result.get("accuracy")
    plot_losses(list(rows.values()), root / "loss.png")
    pairs = paired_ratio(
        rows["lora"].get("interleaved_blocks", []),
        rows["sparselora"].get("interleaved_blocks", []),
        schedule_dense_steps(root / "sparselora", args.steps),
    )
    table = comparison_table(rows, pairs)
    minutes = (time.perf_counter() - start) / 60
    header = (
        f"SmolLM2-135M-Instruct on GSM8K, {args.steps} steps x batch {args.batch_size}, "
        f"same seed and data; preset {rows['sparselora'].get('preset', 'default')}; "
        f"trained interleaved in blocks of {args.block} step(s), {len(pairs.ratios)} pairs "
        f"in the step time ratio; held-out loss on {args.eval_examples} problems, accuracy on "
        f"{args.accuracy_examples}; {minutes:.1f} min in all"
    )
    comparison = header + "\n\n" + table + "\n\n" + interleaving_note(pairs, args.block)
    (root / "comparison.md").write_text(comparison + "\n")
    return comparison
