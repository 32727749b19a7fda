"""What `sparselora eval`, `export` and `estimator build` do with a run folder or a model."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from sparselora.config import SparseLoRAConfig
from sparselora.engine.handle import apply_sparselora
from sparselora.recipes.data import (
    CALIBRATION_EXAMPLES,
    Collator,
    calibration_batches,
    tokenize_prompts,
    tokenize_records,
)
from sparselora.recipes.loading import load_model, load_tokenizer
from sparselora.recipes.records import load_records
from sparselora.recipes.run_config import RunConfig
from sparselora.version import __version__

logger = logging.getLogger(__name__)

# Written into every merged export; `export --overwrite` replaces only a folder that has it.
EXPORT_MARKER = "sparselora_export.json"
# PEFT's adapter weight files, current and older; a finished run folder has one of them.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# `sparselora eval` keeps every evaluation: its per-example predictions in a new file of this
# folder, and its result as one more line of the history (eval.json holds only the latest).
PREDICTIONS_DIR = "predictions"
EVAL_HISTORY = "eval_history.jsonl"


def read_run_config(run_dir: Path) -> RunConfig:
    """The run config of a finished run folder, after checking that its adapter is complete.

    Raises FileNotFoundError naming the run folder and the first missing file: ``run.yaml``,
    ``adapter/adapter_config.json`` or the adapter weights (``adapter/adapter_model.safetensors``,
    or PEFT's older ``adapter_model.bin``).
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run folder {run_dir} does not exist (a folder `sparselora train` wrote)"
        )
    adapter = run_dir / "adapter"
    weights = [adapter / name for name in ADAPTER_WEIGHTS]
    for path in (run_dir / "run.yaml", adapter / "adapter_config.json"):
        if not path.is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a finished run folder: {path} is missing "
                "(written by `sparselora train` when training ends)"
            )
    if not any(path.is_file() for path in weights):
        raise FileNotFoundError(
            f"{run_dir} has no adapter weights: {weights[0]} is missing "
            "(the run did not finish, or the file was deleted; train again)"
        )
    return RunConfig.load(run_dir / "run.yaml")


def load_run(run_dir: Path, quantized: bool = True):
    """(run config, PEFT model with the run's adapter in eval mode, tokenizer).

    A QLoRA run (`model.load_in_4bit`) is loaded in 4-bit, as it was trained, unless
    `quantized=False` (export merges into the float base). Raises FileNotFoundError before
    loading anything if the run folder is incomplete (see ``read_run_config``).
    """
    config = read_run_config(run_dir)
    section = config.model
    model = load_model(
        section.name,
        section.dtype,
        section.attn_implementation,
        load_in_4bit=quantized and section.load_in_4bit,
        bnb_4bit_quant_type=section.bnb_4bit_quant_type,
    )
    tokenizer = load_tokenizer(section.name)
    peft_model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    return config, peft_model.eval(), tokenizer


def evaluate_run(
    run_dir: Path,
    data: str | None = None,
    task: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    allow_code_execution: bool = False,
    loss: bool = True,
) -> dict[str, Any]:
    """Held-out loss and generation accuracy (or HumanEval pass@1) of a run, dense.

    ``data`` defaults to the run's ``data.eval``, ``task`` to its ``data.task``. Before the model
    is loaded, clear errors for: an incomplete run folder, an unknown task, gold answers that do
    not fit the task's rule (``evaluate.check_golds``), HumanEval without the code-execution
    opt-in (``allow_code_execution`` or the environment, see
    ``evaluate.require_code_execution``).

    The held-out loss (``loss=False`` skips it) scores each example's response as the data
    writes it, which in LLM-Adapters' evaluation files is a model-written answer, not a
    reference; the result's ``heldout_loss_note`` says what was scored. Accuracy covers the
    examples with a gold ``answer``.

    Writes, never replacing an earlier evaluation's files:

    - ``RUN/predictions/<task>-<data-file-stem>.jsonl`` (``-2``, ``-3``, ... when taken), one
      row per scored example: ``index`` (0-based, in the data), ``prompt`` (as the model saw
      it), ``generation``, ``extracted``, ``gold``, ``correct``;
    - ``RUN/eval_history.jsonl``: this result appended as one line;

    and ``RUN/eval.json``, the latest evaluation's result (replaced by the next one). The result
    records the predictions file's path under ``predictions``.
    """
    from sparselora.recipes.evaluate import (
        accuracy,
        canonical_task,
        check_golds,
        humaneval_pass_at_1,
        require_code_execution,
    )

    # Clear errors (incomplete run folder, unknown task, golds of the wrong form, no opt-in)
    # before loading the model.
    config = read_run_config(run_dir)
    task = task or config.data.task
    humaneval = task.lower() == "humaneval"
    if humaneval:
        require_code_execution(allow_code_execution)
        task, source, records = "humaneval", "humaneval", []
    else:
        task = canonical_task(task)
        source = data or config.data.eval
        if not source:
            raise ValueError("no held-out data: pass --data or set data.eval in the run config")
        records = load_records(source)[:limit] if limit else load_records(source)
        check_golds(task, [r["answer"] for r in records])
    _, model, tokenizer = load_run(run_dir)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "task": task,
        "data": source,
        "limit": limit,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    rows: list[dict[str, Any]] = []
    if humaneval:
        scores = humaneval_pass_at_1(
            model,
            tokenizer,
            limit=limit,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            allow_code_execution=allow_code_execution,
        )
        rows = [{"index": i, **row} for i, row in enumerate(scores.pop("predictions"))]
        result.update(scores)
    else:
        data_section = config.data
        if loss:
            result.update(
                _heldout_loss(model, tokenizer, records, data_section, source, batch_size)
            )
        scored = [i for i, r in enumerate(records) if r["answer"] is not None]
        if scored:
            # Token ids, cut as in training: no re-tokenisation drift between loss and accuracy.
            prompt_ids = tokenize_prompts(
                [records[i] for i in scored], tokenizer, data_section.template
            )
            prompts = [
                {"prompt": ids[-data_section.prompt_max_length :], "answer": records[i]["answer"]}
                for i, ids in zip(scored, prompt_ids, strict=True)
            ]
            scores = accuracy(model, tokenizer, prompts, task, max_new_tokens, batch_size)
            rows = [
                {"index": i, **row}
                for i, row in zip(scored, scores.pop("predictions"), strict=True)
            ]
            result.update(scores)
        else:
            logger.warning("no example in %s has a gold answer: accuracy not computed", source)
            result["accuracy_note"] = f"not computed: no example in {source} has an answer"
    result["predictions"] = str(_write_predictions(run_dir, task, source, rows)) if rows else None
    text = json.dumps(result, indent=2)
    (run_dir / "eval.json").write_text(text + "\n")
    with open(run_dir / EVAL_HISTORY, "a", encoding="utf-8") as history:
        history.write(json.dumps(result) + "\n")
    return result


def _heldout_loss(model, tokenizer, records, data_section, source: str, batch_size: int) -> dict:
    """``{"heldout_loss", "heldout_loss_note"}``; the loss is None (and the note says why) when
    no example keeps a response token to score, which must not stop the accuracy."""
    from sparselora.recipes.evaluate import heldout_loss

    try:
        examples, _ = tokenize_records(
            records,
            tokenizer,
            data_section.max_length,
            data_section.prompt_max_length,
            data_section.template,
        )
    except ValueError as err:  # empty responses, or prompts that fill data.max_length
        logger.warning("held-out loss not computed: %s", err)
        return {"heldout_loss": None, "heldout_loss_note": f"not computed: {err}"}
    collator = Collator(tokenizer.pad_token_id, data_section.padding_side)
    batches = [collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    return {
        "heldout_loss": heldout_loss(model, batches),
        "heldout_loss_note": heldout_loss_note(source),
    }


def heldout_loss_note(source: str) -> str:
    """What the held-out loss of ``evaluate_run`` on ``source`` scores, for eval.json."""
    if source.lower().startswith("gsm8k"):
        return (
            "mean token cross-entropy of the reference worked solutions of the embedded GSM8K "
            "held-out split"
        )
    return (
        f"mean token cross-entropy of each example's response as written in {source} (the "
        "'output' field of instruction/output rows, 'completion', or the last assistant "
        "message). In LLM-Adapters' evaluation files (e.g. AQuA/test.json, boolq/test.json) "
        "'output' is a model-written answer, not a reference: compare this loss only between "
        "runs on the same file, and judge quality by the accuracy (--no-loss skips it)"
    )


def _write_predictions(run_dir: Path, task: str, source: str, rows: list[dict]) -> Path:
    """Write ``rows`` as JSONL to a new file ``RUN/predictions/<task>-<data stem>[-N].jsonl``.

    The file is created exclusively (never overwriting one, even from a concurrent
    evaluation); N counts up from 2 while the name is taken."""
    folder = run_dir / PREDICTIONS_DIR
    folder.mkdir(exist_ok=True)
    if task == "humaneval":
        base = task
    else:
        name = source if source.lower().startswith("gsm8k") else Path(source).stem
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task}-{name}")
    path, n = folder / f"{base}.jsonl", 1
    while True:
        try:
            with open(path, "x", encoding="utf-8") as file:
                file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        except FileExistsError:
            n += 1
            path = folder / f"{base}-{n}.jsonl"
            continue
        logger.info("predictions written to %s", path)
        return path


def export_merged(
    run_dir: Path, output: Path | None = None, atol: float = 1e-4, overwrite: bool = False
) -> Path:
    """Merge the run's adapter into its base model, check the logits, save with save_pretrained.

    ``output`` defaults to ``RUN_DIR/merged``. Nothing but a previous export is ever replaced:
    before the model is loaded, a ValueError refuses an output that is the run folder, a folder
    above it, any folder inside it other than ``RUN_DIR/merged``, an existing file, or a
    non-empty folder, unless ``overwrite`` is set and the folder holds ``EXPORT_MARKER`` (which
    every export writes: run folder, time, sparselora version). The model is written into a
    uniquely named temporary folder beside ``output`` and renamed into place only when complete;
    on failure the temporary folder is removed and a previous export is left as it was.
    """
    output = _export_target(run_dir, output, overwrite)
    config, model, tokenizer = load_run(run_dir, quantized=False)  # merge into float
    sample = tokenizer("Natalia sold clips to 48 of her friends in April.", return_tensors="pt")
    with torch.no_grad():
        expected = model(**sample).logits.float()
        merged = model.merge_and_unload()
        got = merged(**sample).logits.float()
    error = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    if error > atol * max(1.0, scale):
        raise RuntimeError(
            f"merged logits differ from the adapter's by {error:.3g} (scale {scale:.3g})"
        )
    marker = {
        "run": str(run_dir.resolve()),
        "base_model": config.model.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "sparselora_version": __version__,
        "max_logit_difference": error,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".export", dir=output.parent))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("merged model: max |logit difference| %.3g; saved to %s", error, output)
    return output


def _export_target(run_dir: Path, output: Path | None, overwrite: bool) -> Path:
    """The resolved folder ``export_merged`` may write, or a ValueError saying why not and what
    to do instead. Reads only the file system (cheap), so it runs before the model is loaded."""
    read_run_config(run_dir)  # a clear error for an incomplete run folder, before anything else
    run = run_dir.resolve()
    default = run / "merged"
    target = Path(output).resolve() if output is not None else default
    shown = output if output is not None else default
    if target == run:
        raise ValueError(
            f"--output {shown} is the run folder {run_dir} itself; exporting there would replace "
            f"its adapter, checkpoints and run.yaml; choose a new folder, e.g. {default} (the "
            "default)"
        )
    if target in run.parents:
        raise ValueError(
            f"--output {shown} contains the run folder {run_dir}; exporting there would replace "
            f"the run; choose a new folder, e.g. {default} (the default)"
        )
    if run in target.parents and target != default:
        raise ValueError(
            f"--output {shown} is inside the run folder {run_dir}; the only export folder there is "
            f"{default} (the default); choose it or a folder outside the run"
        )
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"--output {shown} is a file; choose a folder that does not exist yet (or a previous "
            "export, with --overwrite)"
        )
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--output {shown} already exists and is not empty; pass --overwrite to replace "
                "a previous export, or choose a new folder"
            )
        if not (target / EXPORT_MARKER).is_file():
            raise ValueError(
                f"--output {shown} is not a sparselora export (no {EXPORT_MARKER} in it), and "
                "--overwrite replaces only a previous export; choose a new folder"
            )
    return target


def _replace_folder(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` to ``target``; a folder already at ``target`` (checked
    by ``_export_target``) is moved aside first and restored if the rename fails."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, aside / target.name)
        try:
            os.replace(new, target)
        except OSError:
            os.replace(aside / target.name, target)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def build_estimator_file(
    model_name: str,
    config_path: str | None,
    preset: str | None,
    kind: str | None,
    rank: int | None,
    output: str | None,
    data: str = "gsm8k:train",
) -> Path:
    """Build the estimator for a model and sparsity config; save it to `output` or the cache."""
    if config_path:
        config = SparseLoRAConfig.load(config_path)
    elif preset:
        config = SparseLoRAConfig.from_preset(preset)
    else:
        raise ValueError("estimator build needs --config or --preset (which layers to sparsify)")
    overrides = {k: v for k, v in (("estimator", kind), ("estimator_rank", rank)) if v is not None}
    if overrides:
        config = SparseLoRAConfig.from_dict({**config.to_dict(), **overrides})
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    calibration = None
    if config.estimator == "whitened_svd":
        examples, _ = tokenize_records(load_records(data)[:CALIBRATION_EXAMPLES], tokenizer)
        calibration = calibration_batches(examples, Collator(tokenizer.pad_token_id))
    handle = apply_sparselora(model, config, calibration=calibration)
    estimator = handle.estimator
    handle.remove()
    if output:
        estimator.save(output)
        return Path(output)
    path = handle.cache.path(
        estimator.fingerprint, estimator.kind, estimator.rank, estimator.calibration
    )
    if not path.is_file():  # the cache could not be written (already warned why)
        raise OSError(f"the estimator could not be saved to the cache {path}; pass --output FILE")
    return path
