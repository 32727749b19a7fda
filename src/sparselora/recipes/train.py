"""The training recipe: LoRA or SparseLoRA fine-tuning through the Hugging Face Trainer.

`train(run_config)` loads the model and data, wraps the model in PEFT LoRA (and SparseLoRA),
trains with the Trainer (so accelerate, DDP, FSDP and DeepSpeed work as usual), and writes the
run folder:

    RUN_DIR/run.yaml               the validated run config, sparselora section resolved; written
                                   once the data and the model have loaded
    RUN_DIR/checkpoint-N/          Trainer checkpoints; complete once `sparselora_complete.json`
                                   exists (written last: sizes and sha256 of the files, and the
                                   run's FLOPs, FLOPs saved, seconds and step times so far)
    RUN_DIR/checkpoint-N.corrupt/  a complete checkpoint that failed its check on resume
    RUN_DIR/adapter/               the final adapter in plain PEFT format, plus sparselora.yaml
                                   and estimator.json (kind, rank, fingerprint) beside it
    RUN_DIR/loss.png               training loss against step and against time
    RUN_DIR/trainer_state.json     the Trainer's whole log history, evaluations included
    RUN_DIR/summary.json           step time, tokens/s, FLOPs, peak memory, losses, over the
                                   whole run across resumes (in the interleaved demo, also the
                                   times of its turns' blocks); written last: the run is finished
    RUN_DIR/finished-step-N/       a finished run's result, kept when a larger max_steps
                                   continued the run
    RUN_DIR/runs/                  TensorBoard logs
    RUN_DIR.replaced-K/            an earlier run in RUN_DIR, moved aside by overwrite=True

A re-run into RUN_DIR reports a finished run as finished, resumes an unfinished one from its
newest checkpoint that passes its check, continues a finished one whose max_steps grew, and
refuses (RunFolderError) a run that differs in a key that changes the result: see
sparselora.recipes.run_folder for the rules, the keys, and the save order that makes a kill at
any moment lose at most the steps since the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers import set_seed as hf_set_seed

from sparselora.config import IGNORE_INDEX
from sparselora.engine.flops import step_flops
from sparselora.engine.handle import SparseLoRA, apply_sparselora
from sparselora.engine.schedule import SparseLoRACallback
from sparselora.engine.shapes import STAGE as FLOPS_TARGETS
from sparselora.engine.shapes import ModelShape
from sparselora.recipes.data import Collator, calibration_batches, tokenize_records
from sparselora.recipes.loading import add_lora, load_model, load_tokenizer, resolve_dtype
from sparselora.recipes.records import load_records
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.run_folder import (
    CheckpointTotals,
    RunFolder,
    atomic_write,
    checkpoint_totals,
    find_resume,
    kill_point,
    last_complete_checkpoint,
    mark_complete,
    rotate_checkpoints,
    unmark,
)
from sparselora.recipes.turns import TurnTaking
from sparselora.version import __version__

logger = logging.getLogger(__name__)


def load_examples(source: str, tokenizer, config: RunConfig, limit: int | None) -> list[dict]:
    records = load_records(source)
    if limit is not None:
        records = records[:limit]
    data = config.data
    examples, _ = tokenize_records(
        records, tokenizer, data.max_length, data.prompt_max_length, data.template
    )
    return examples


class RunRecorder(TrainerCallback):
    """Step times and wall-clock training time, both continued across resumes. With `turns`
    (the interleaved demo, sparselora.recipes.turns) the time spent waiting for the partner
    run's turns is left out of both."""

    def __init__(self, turns: TurnTaking | None = None) -> None:
        self.step_times: list[float] = []
        self.elapsed_before_resume = 0.0
        self.turns = turns
        self._step_start = 0.0
        self._train_start = time.perf_counter()

    def wall_seconds(self) -> float:
        waited = self.turns.waited_seconds if self.turns is not None else 0.0
        return self.elapsed_before_resume + time.perf_counter() - self._train_start - waited

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._step_start)


class RecipeTrainer(Trainer):
    """The HF Trainer, logging wall-clock time and SparseLoRA statistics with every record
    (so they reach TensorBoard, trainer_state.json and a resumed run's history), and saving
    checkpoints so that a kill at any moment leaves the newest complete one intact: marker
    after the files, rotation after the marker (sparselora.recipes.run_folder). Pass
    `save_total_limit=None` in the TrainingArguments and the limit as `keep_checkpoints`."""

    def __init__(
        self,
        *args,
        recorder: RunRecorder,
        handle: SparseLoRA | None,
        lora_section,
        keep_checkpoints: int | None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.handle = handle
        self.shape = ModelShape.from_config(self.model.config)
        self.lora_section = lora_section
        self.keep_checkpoints = keep_checkpoints
        self.train_flops = 0.0

    def totals(self) -> CheckpointTotals:
        """The run's totals so far, resumes included."""
        return CheckpointTotals(
            train_flops=self.train_flops,
            flops_saved=self.handle.stats.flops_saved if self.handle is not None else 0.0,
            dense_steps=self.handle.stats.dense_steps if self.handle is not None else 0,
            train_seconds=self.recorder.wall_seconds(),
            step_times=list(self.recorder.step_times),
        )

    def restore_totals(self, totals: CheckpointTotals) -> None:
        """Continue the totals of the run a checkpoint belongs to (FLOPs saved replace the
        count of this process's calibration, which the checkpoint's count already holds)."""
        self.train_flops = totals.train_flops
        if self.handle is not None:
            self.handle.stats.flops_saved = totals.flops_saved
            self.handle.stats.dense_steps = totals.dense_steps
        self.recorder.elapsed_before_resume = totals.train_seconds
        self.recorder.step_times = list(totals.step_times)

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        step = self.state.global_step
        if self.args.should_save:
            unmark(folder)  # a folder left at this step by an earlier attempt is rewritten
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        kill_point("saved", step)
        mark_complete(folder, step, self.totals())
        kill_point("marked", step)
        rotate_checkpoints(folder.parent, self.keep_checkpoints, step)
        kill_point("rotated", step)

    def training_step(self, model, inputs, *args, **kwargs):
        self.train_flops += self._batch_flops(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def _batch_flops(self, inputs) -> float:
        """Analytic FLOPs of this micro-batch (sparselora.engine.flops), from its padded shape and
        its mean labelled and padding token counts per row."""
        batch, length = inputs["input_ids"].shape
        out = round((inputs["labels"] != IGNORE_INDEX).sum().item() / batch)
        pad = round((inputs["attention_mask"] == 0).sum().item() / batch)
        sparse = self.handle is not None and self.handle.enabled and self.handle.ready
        return step_flops(
            self.shape,
            length,
            min(out, length),
            batch,
            lora_rank=self.lora_section.r,
            lora_targets=[t for t in self.lora_section.target_modules if t in FLOPS_TARGETS],
            config=self.handle.config if sparse else None,
            pad_tokens=min(pad, length - min(out, length)),
        )["total"]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        logs["wall_seconds"] = self.recorder.wall_seconds()
        if self.handle is not None and "loss" in logs:
            for name, value in self.handle.stats.window().items():
                logs[f"sparselora/{name}"] = value
        super().log(logs, *args, **kwargs)


def reset_peak_memory() -> bool:
    """Start a fresh peak: CUDA's allocator counter, or on Linux the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs). False where the peak cannot be reset, so that
    `peak_memory_mb` then also covers what ran before (model loading)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> float:
    """CUDA: peak allocated MiB; CPU: peak resident set size (Linux VmHWM, else ru_maxrss)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20


def train(
    config: RunConfig, callbacks: list[TrainerCallback] | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run one fine-tuning job; returns the summary also written to RUN_DIR/summary.json.

    `callbacks` are extra Trainer callbacks. Into a run folder that already holds a run, this
    finishes, resumes, continues or refuses it as sparselora.recipes.run_folder describes;
    `overwrite=True` (`sparselora train --overwrite`) first moves that run aside to
    RUN_DIR.replaced-K and trains afresh. Raises RunFolderError (a ValueError) when refused.
    """
    turns = TurnTaking.from_environment()  # first: a partner waiting on us sees us from here on
    training = config.training
    run_dir = Path(training.output_dir)
    folder = RunFolder(run_dir)
    folder.check(config, overwrite)  # a different run is refused before anything loads
    warning = config.default_eval_warning()
    if warning:
        logger.warning(warning)

    section = config.model
    tokenizer = load_tokenizer(section.name)
    train_examples = load_examples(
        config.data.train, tokenizer, config, config.data.max_train_examples
    )
    eval_examples = (
        load_examples(config.data.eval, tokenizer, config, config.data.max_eval_examples)
        if config.data.eval
        else []
    )
    collator = Collator(tokenizer.pad_token_id, config.data.padding_side)
    args = training_arguments(config, run_dir, evaluate=bool(eval_examples))
    plan = folder.plan(config, len(train_examples), args.world_size, overwrite)
    if plan.action == "finished":
        summary = folder.summary()
        logger.info(
            "%s is a finished run of %d steps: nothing to train, its summary is returned (a "
            "larger training.max_steps continues it; a new training.output_dir or --overwrite "
            "trains again)", run_dir, summary["steps"],
        )  # fmt: skip
        return summary

    hf_set_seed(training.seed)
    model = load_model(
        section.name,
        section.dtype,
        section.attn_implementation,
        load_in_4bit=section.load_in_4bit,
        bnb_4bit_quant_type=section.bnb_4bit_quant_type,
    )
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = config.lora
    model = add_lora(model, lora.r, lora.alpha, lora.target_modules, lora.dropout)
    handle = None
    callbacks = list(callbacks or [])
    if training.method == "sparselora":
        sparse_config = config.sparse_config()
        calibration = None
        if sparse_config.estimator == "whitened_svd":
            # A fixed calibration set (not the first batches of the shuffled stream) keeps the
            # estimator identical when a run resumes from a checkpoint.
            calibration = calibration_batches(train_examples, collator)
        handle = apply_sparselora(model, sparse_config, calibration=calibration)
        callbacks.append(SparseLoRACallback(handle))
    recorder = RunRecorder(turns)
    if turns is not None:
        callbacks.append(turns)  # before the recorder: its waits end before a step's timer starts
    callbacks.append(recorder)
    trainer = RecipeTrainer(
        recorder=recorder,
        handle=handle,
        lora_section=config.lora,
        keep_checkpoints=training.save_total_limit,
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=collator,
        callbacks=callbacks,
    )

    # Everything has loaded: only now does the run folder change (on the main process).
    resume, failed = find_resume(run_dir) if plan.action in ("resume", "continue") else (None, [])
    if plan.action in ("resume", "continue") and resume is None and not failed:
        logger.warning("%s holds no complete checkpoint: training from step 0", run_dir)
    _wait_for_everyone(args)
    if args.should_save:
        folder.prepare(plan, config, failed)
    _wait_for_everyone(args)

    totals = CheckpointTotals()
    if resume is not None:
        logger.info("resuming from %s", resume)
        totals = checkpoint_totals(resume) or CheckpointTotals(
            train_seconds=_previous_wall_seconds(resume)
        )
        trainer.restore_totals(totals)
    peak_from_training = reset_peak_memory()
    saved = TrainerState.load_from_json(str(resume / "trainer_state.json")) if resume else None
    if saved is not None and saved.global_step >= plan.total_steps:
        # Killed after its last checkpoint: restore it (the Trainer would take one more step).
        set_peft_model_state_dict(model, load_peft_weights(str(resume)))
        trainer.state = saved
        train_seconds = totals.train_seconds
    else:
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except KeyboardInterrupt:
            last = last_complete_checkpoint(run_dir)
            logger.warning("interrupted; the last complete checkpoint is %s", last or "none")
            raise
        train_seconds = recorder.wall_seconds()
    peak_mb = peak_memory_mb()  # before the final evaluation's full-vocabulary logits
    trainer.save_state()  # RUN_DIR/trainer_state.json: the whole log history, evals included
    save_adapter(run_dir, model, tokenizer, handle, main_process=args.should_save)

    eval_loss = None
    if eval_examples:
        from sparselora.recipes.evaluate import heldout_loss

        batches = [
            collator(eval_examples[i : i + training.batch_size])
            for i in range(0, len(eval_examples), training.batch_size)
        ]
        eval_loss = heldout_loss(model, batches)

    tokens = sum(len(e["input_ids"]) for e in train_examples)
    step_times = recorder.step_times
    final = trainer.totals()  # resumes included
    summary = {
        "method": training.method,
        "model": config.model.name,
        "preset": handle.config.preset if handle is not None else None,
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "median_step_seconds": statistics.median(step_times) if step_times else None,
        "tokens_per_second": _tokens_per_second(trainer, step_times, tokens, len(train_examples)),
        "peak_memory_mb": peak_mb,
        "peak_memory_scope": "training" if peak_from_training else "process",
        "eval_loss": eval_loss,
        "train_loss_curve": [
            {"step": r["step"], "loss": r["loss"], "wall_seconds": r.get("wall_seconds")}
            for r in trainer.state.log_history
            if "loss" in r
        ],
        "train_flops": final.train_flops,
        "flops_saved": final.flops_saved,
        "dense_steps": final.dense_steps,
        "resumed_from": str(resume) if resume else None,
        "version": __version__,
    }
    if turns is not None:
        summary["interleaved_blocks"] = turns.blocks
    if args.should_save:
        plot_losses([summary], run_dir / "loss.png")
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))  # last: finished
    return summary


def training_arguments(config: RunConfig, run_dir: Path, evaluate: bool) -> TrainingArguments:
    """The Trainer's arguments for a run. Checkpoint rotation is left to RecipeTrainer
    (`keep_checkpoints`), which deletes an old checkpoint only once a newer one is complete."""
    training = config.training
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=float(training.warmup_ratio),  # a float in [0, 1) is a ratio
        weight_decay=training.weight_decay,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        logging_steps=config.logging.logging_steps,
        save_strategy="steps" if training.save_steps > 0 else "no",
        save_steps=max(1, training.save_steps),
        save_total_limit=None,
        eval_strategy="steps" if training.eval_steps > 0 and evaluate else "no",
        eval_steps=training.eval_steps if training.eval_steps > 0 else None,
        seed=training.seed,
        data_seed=training.seed,
        report_to=["tensorboard"] if config.logging.tensorboard else [],
        remove_unused_columns=False,
        use_cpu=not on_gpu,
        bf16=on_gpu and resolve_dtype(config.model.dtype) == torch.bfloat16,
        prediction_loss_only=True,  # never gather (examples, length, vocab) logits
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def save_adapter(run_dir: Path, model, tokenizer, handle: SparseLoRA | None, main_process: bool):
    """RUN_DIR/adapter, written whole: into adapter.tmp, then renamed over any adapter/ left by a
    kill of this same run before its summary. Every process computes the state dict (FSDP
    gathers it); the main process writes."""
    tmp, final = run_dir / "adapter.tmp", run_dir / "adapter"
    if main_process and tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, is_main_process=main_process)
    if not main_process:
        return
    tokenizer.save_pretrained(tmp)
    if handle is not None:
        handle.config.save(tmp / "sparselora.yaml")
        estimator = handle.estimator
        (tmp / "estimator.json").write_text(
            json.dumps(
                {
                    "kind": estimator.kind if estimator else None,
                    "rank": estimator.rank if estimator else None,
                    "fingerprint": estimator.fingerprint if estimator else None,
                },
                indent=2,
            )
        )
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _wait_for_everyone(args: TrainingArguments) -> None:
    if args.distributed_state is not None:
        args.distributed_state.wait_for_everyone()


def _tokens_per_second(trainer, step_times, tokens, examples) -> float | None:
    if not step_times or not examples:
        return None
    per_step = tokens / examples * trainer.args.per_device_train_batch_size
    per_step *= trainer.args.gradient_accumulation_steps
    return per_step / statistics.median(step_times)


def _previous_wall_seconds(checkpoint: Path) -> float:
    state_file = checkpoint / "trainer_state.json"
    if not state_file.exists():
        return 0.0
    history = json.loads(state_file.read_text()).get("log_history", [])
    times = [r["wall_seconds"] for r in history if "wall_seconds" in r]
    return max(times, default=0.0)


def plot_losses(summaries: list[dict[str, Any]], path: Path) -> None:
    """Training loss against step and against wall-clock time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for summary in summaries:
        curve = summary["train_loss_curve"]
        if not curve:
            continue
        label = summary["method"]
        by_step.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=label)
        by_time.plot([p["wall_seconds"] for p in curve], [p["loss"] for p in curve], label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall-clock seconds")
    for axis in (by_step, by_time):
        axis.set_ylabel("training loss")
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
