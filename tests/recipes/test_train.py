"""The training recipe end to end on a tiny local model (fast): run folder, resume, export."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback

from sparselora.config import ConfigError
from sparselora.recipes.commands import evaluate_run, export_merged
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.train import (
    last_complete_checkpoint,
    peak_memory_mb,
    reset_peak_memory,
    train,
)
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local model directory: tiny random LLaMA (2 layers) with SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path, layers=2, hidden=32)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """LLM-Adapters style math data with numeric answers."""
    rows = [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}", "answer": str(a + b)}
        for a, b in [(i, 2 * i + 1) for i in range(24)]
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "math.json"
    path.write_text(json.dumps(rows))
    return path


def run_config(tiny_dir, data_file, out, **training) -> RunConfig:
    overrides = [
        f"model.name={tiny_dir}",
        f"data.train={data_file}",
        f"data.eval={data_file}",
        "data.max_eval_examples=8",
        "data.max_length=64",
        f"training.output_dir={out}",
        "training.batch_size=4",
        "training.learning_rate=0.01",
        "training.warmup_ratio=0.0",
        "logging.tensorboard=false",
        "sparselora.preset=null",
        "sparselora.ffn_sparsity=0.5",
        "sparselora.attn_sparsity={'1': 0.5}",
        "sparselora.start_step=0.25",
        "sparselora.calibration_tokens=1",
    ]
    overrides += [f"training.{k}={v}" for k, v in training.items()]
    return RunConfig.load(None, overrides)


def test_train_writes_a_complete_run_folder(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    summary = train(run_config(tiny_dir, data_file, out, max_steps=4, save_steps=2))
    assert summary["steps"] == 4 and summary["method"] == "sparselora"
    assert summary["flops_saved"] > 0 and summary["eval_loss"] > 0
    assert summary["peak_memory_mb"] > 0 and summary["peak_memory_scope"] in ("training", "process")
    assert [p["step"] for p in summary["train_loss_curve"]] == [1, 2, 3, 4]
    for name in ("run.yaml", "summary.json", "loss.png", "adapter/adapter_config.json",
                 "adapter/sparselora.yaml", "adapter/estimator.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert json.loads((out / "adapter/estimator.json").read_text())["kind"] == "whitened_svd"
    assert last_complete_checkpoint(out).name == "checkpoint-4"
    history = json.loads((out / "checkpoint-4/trainer_state.json").read_text())["log_history"]
    sparse_logs = [r for r in history if "sparselora/ffn_kept" in r]
    assert [r["step"] for r in sparse_logs] == [2, 3, 4]  # dense for the first 25% of steps
    assert sparse_logs[0]["sparselora/ffn_kept"] == pytest.approx(0.5)
    # the adapter is plain PEFT
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    PeftModel.from_pretrained(base, out / "adapter")
    # the LoRA baseline from the same config does the same steps with more FLOPs
    lora = train(
        run_config(tiny_dir, data_file, tmp_path / "lora", max_steps=4, save_steps=0, method="lora")
    )
    assert lora["method"] == "lora" and lora["flops_saved"] == 0
    assert lora["train_flops"] > summary["train_flops"] > 0


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_dir, data_file, tmp_path):
    full = train(run_config(tiny_dir, data_file, tmp_path / "a", max_steps=6, save_steps=3))

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    config = run_config(tiny_dir, data_file, tmp_path / "b", max_steps=6, save_steps=3)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[Interrupt()])
    assert last_complete_checkpoint(tmp_path / "b").name == "checkpoint-3"
    # an unfinished checkpoint (no marker) is never resumed from
    (tmp_path / "b/checkpoint-5").mkdir()
    resumed = train(config)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    expected = {p["step"]: p["loss"] for p in full["train_loss_curve"]}
    got = {p["step"]: p["loss"] for p in resumed["train_loss_curve"]}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5)


def test_export_merged_equals_adapter_and_eval_runs(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_dir, data_file, out, max_steps=2, save_steps=0))
    merged_dir = export_merged(out)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), out / "adapter"
    ).eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    torch.testing.assert_close(
        merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-5, atol=1e-5
    )
    result = evaluate_run(out, task="gsm8k", limit=4, max_new_tokens=4, batch_size=2)
    assert result["total"] == 4 and 0.0 <= result["accuracy"] <= 1.0 and result["heldout_loss"] > 0
    assert (out / "eval.json").exists()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["training.method=qlora"], "training.method"),
        (["training.batch_size=0"], "training.batch_size"),
        (["lora.r=abc"], "lora.r"),
        (["training.lr=1e-4"], "training.lr"),
        (["data.padding_side=middle"], "data.padding_side"),
        (["sparselora.ffn_sparsity=1.5"], "ffn_sparsity"),
        (["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing"),
        (["nonsense"], "section.key=value"),
    ],
)
def test_run_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunConfig.load(None, overrides + ["sparselora.preset=null"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.yaml")


def test_peak_memory_reset_forgets_what_ran_before():
    """The summary's peak covers training only: a large allocation freed before the reset
    (model loading, in a run) must not count."""
    block = torch.ones(100 * 2**20)  # 400 MiB, touched
    del block
    before = peak_memory_mb()
    if not reset_peak_memory():
        pytest.skip("this platform cannot reset the process's peak memory")
    after = peak_memory_mb()
    assert before - after > 300, (before, after)
