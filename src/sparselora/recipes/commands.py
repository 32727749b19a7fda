"""What `sparselora eval`, `export` and `estimator build` do with a run folder or a model."""

from __future__ import annotations

import json
import logging
import os
import shutil
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
    tokenize_records,
)
from sparselora.recipes.loading import load_model, load_tokenizer
from sparselora.recipes.records import load_records
from sparselora.recipes.run_config import RunConfig

logger = logging.getLogger(__name__)


def load_run(run_dir: Path):
    """(run config, PEFT model with the run's adapter in eval mode, tokenizer)."""
    config_file, adapter = run_dir / "run.yaml", run_dir / "adapter"
    if not config_file.exists() or not adapter.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a finished run folder (needs run.yaml and adapter/)"
        )
    config = RunConfig.load(config_file)
    section = config.model
    model = load_model(section.name, section.dtype, section.attn_implementation)
    tokenizer = load_tokenizer(section.name)
    return config, PeftModel.from_pretrained(model, adapter).eval(), tokenizer


def evaluate_run(
    run_dir: Path,
    data: str | None = None,
    task: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Held-out loss and generation accuracy (or HumanEval pass@1), dense; writes eval.json."""
    from sparselora.recipes.evaluate import (
        accuracy,
        canonical_task,
        heldout_loss,
        humaneval_pass_at_1,
    )

    config, model, tokenizer = load_run(run_dir)
    task = task or config.data.task
    result: dict[str, Any] = {"run": str(run_dir), "task": task}
    if task.lower() == "humaneval":
        result.update(
            humaneval_pass_at_1(
                model, tokenizer, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        )
    else:
        canonical_task(task)  # a clear error before any generation
        source = data or config.data.eval
        if not source:
            raise ValueError("no held-out data: pass --data or set data.eval in the run config")
        records = load_records(source)[:limit] if limit else load_records(source)
        examples, _ = tokenize_records(
            records,
            tokenizer,
            config.data.max_length,
            config.data.prompt_max_length,
            config.data.template,
        )
        collator = Collator(tokenizer.pad_token_id, config.data.padding_side)
        batches = [
            collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)
        ]
        result["heldout_loss"] = heldout_loss(model, batches)
        prompts = [
            {"prompt": e["prompt_ids"], "answer": e["answer"]}  # ids: no re-tokenisation drift
            for e in examples
            if e["answer"] is not None
        ]
        if prompts:
            result.update(accuracy(model, tokenizer, prompts, task, max_new_tokens, batch_size))
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def export_merged(run_dir: Path, output: Path | None = None, atol: float = 1e-4) -> Path:
    """Merge the run's adapter into its base model, check the logits, save with save_pretrained."""
    _, model, tokenizer = load_run(run_dir)
    output = output or run_dir / "merged"
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
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    logger.info("merged model: max |logit difference| %.3g; saved to %s", error, output)
    return output


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
    return handle.cache.path(estimator.fingerprint, estimator.kind, estimator.rank)
