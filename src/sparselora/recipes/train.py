"""The training recipe: LoRA or SparseLoRA fine-tuning through the Hugging Face Trainer.

`train(run_config)` loads the model and data, wraps the model in PEFT LoRA (and SparseLoRA),
trains with the Trainer (so accelerate, DDP, FSDP and DeepSpeed work as usual), and writes the
run folder:

    RUN_DIR/run.yaml               the validated run config
    RUN_DIR/checkpoint-N/          Trainer checkpoints; complete once `sparselora_complete.json` exists
    RUN_DIR/adapter/               the final adapter in plain PEFT format, plus sparselora.yaml
                                   and estimator.json (kind, rank, fingerprint) beside it
    RUN_DIR/summary.json           step time, tokens/s, FLOPs, peak memory of training, losses
    RUN_DIR/loss.png               training loss against step and against time
    RUN_DIR/runs/                  TensorBoard logs
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
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
from sparselora.version import __version__

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "sparselora_complete.json"


def load_examples(source: str, tokenizer, config: RunConfig, limit: int | None) -> list[dict]:
    records = load_records(source)
    if limit is not None:
        records = records[:limit]
    data = config.data
    examples, _ = tokenize_records(
        records, tokenizer, data.max_length, data.prompt_max_length, data.template
    )
    return examples


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished (marker written last, atomically)."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunRecorder(TrainerCallback):
    """Step times and wall-clock time; marks finished checkpoints complete."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.elapsed_before_resume = 0.0
        self._step_start = 0.0
        self._train_start = time.perf_counter()

    def wall_seconds(self) -> float:
        return self.elapsed_before_resume + time.perf_counter() - self._train_start

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._step_start)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            marker = {"step": state.global_step, "time": time.time(), "version": __version__}
            _atomic_write(folder / COMPLETE_MARKER, json.dumps(marker))


class RecipeTrainer(Trainer):
    """The HF Trainer, logging wall-clock time and SparseLoRA statistics with every record
    (so they reach TensorBoard, trainer_state.json and a resumed run's history)."""

    def __init__(
        self, *args, recorder: RunRecorder, handle: SparseLoRA | None, lora_section, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.handle = handle
        self.shape = ModelShape.from_config(self.model.config)
        self.lora_section = lora_section
        self.train_flops = 0.0

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


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run one fine-tuning job; returns the summary also written to RUN_DIR/summary.json.

    `callbacks` are extra Trainer callbacks. Resumes from the last complete checkpoint in the
    run folder when `training.resume` is true.
    """
    run_dir = Path(config.training.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "run.yaml")
    training = config.training
    hf_set_seed(training.seed)

    section = config.model
    model = load_model(section.name, section.dtype, section.attn_implementation)
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
    recorder = RunRecorder()
    callbacks.append(recorder)

    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
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
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if training.eval_steps > 0 and eval_examples else "no",
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
    trainer = RecipeTrainer(
        recorder=recorder,
        handle=handle,
        lora_section=config.lora,
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=collator,
        callbacks=callbacks,
    )

    resume = last_complete_checkpoint(run_dir) if training.resume else None
    if resume is not None:
        logger.info("resuming from %s", resume)
        recorder.elapsed_before_resume = _previous_wall_seconds(resume)
    peak_from_training = reset_peak_memory()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(run_dir)
        logger.warning("interrupted; the last complete checkpoint is %s", last or "none")
        raise
    train_seconds = time.perf_counter() - start
    peak_mb = peak_memory_mb()  # before the final evaluation's full-vocabulary logits
    trainer.save_state()  # RUN_DIR/trainer_state.json: the whole log history, evals included

    adapter_dir = run_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if handle is not None:
        handle.config.save(adapter_dir / "sparselora.yaml")
        estimator = handle.estimator
        (adapter_dir / "estimator.json").write_text(
            json.dumps(
                {
                    "kind": estimator.kind if estimator else None,
                    "rank": estimator.rank if estimator else None,
                    "fingerprint": estimator.fingerprint if estimator else None,
                },
                indent=2,
            )
        )

    eval_loss = None
    if eval_examples:
        from sparselora.recipes.evaluate import heldout_loss

        batches = [
            collator(eval_examples[i : i + training.batch_size])
            for i in range(0, len(eval_examples), training.batch_size)
        ]
        eval_loss = heldout_loss(model, batches)

    tokens = sum(len(e["input_ids"]) for e in train_examples)
    steps = trainer.state.global_step
    step_times = recorder.step_times
    summary = {
        "method": training.method,
        "model": config.model.name,
        "preset": handle.config.preset if handle is not None else None,
        "steps": steps,
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
        "train_flops": trainer.train_flops,
        "flops_saved": handle.stats.flops_saved if handle is not None else 0.0,
        "resumed_from": str(resume) if resume else None,
        "version": __version__,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_losses([summary], run_dir / "loss.png")
    return summary


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
