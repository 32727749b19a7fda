"""SparseLoRA under TRL's SFTTrainer (trl 1.16), set up as TRL users write it: the trainer
builds the PEFT model from `peft_config`, `apply_sparselora(trainer.model, ...)` wraps the model
it trains, and `SparseLoRACallback` follows the schedule. Prompt/completion records,
completion-only loss, gradient accumulation 2, padded batches and padding-free packing, TRL's
default gradient checkpointing; CPU, fp32.

TRL trains through its own LM head: `SFTTrainer.__init__` calls `add_fused_lm_head` on the
transformers model (trl/trainer/sft_trainer.py:1144), and `compute_loss` calls
`model(**inputs, fused_lm_head=True)` (sft_trainer.py:1611), which runs the decoder body and
then log-probabilities of the labelled positions, without building logits (`_fused_forward`,
trl/trainer/utils.py:1599; on the CPU it scores every position and masks, utils.py:1642).
So our `LabelledLogits` never runs there (it steps aside for the unknown `fused_lm_head`
argument); the last layer's context-token saving does, because our pre-hook still sees labels.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sparselora import SparseLoRACallback, SparseLoRAConfig, apply_sparselora
from tests.conftest import ATTN, MLP, save_tiny_llama

STEPS = 2  # optimizer steps, of 2 micro-batches each
EXACT = 1e-6  # relative, fp32: exact savings against plain LoRA, every logged step
CHANNELS = {"ffn_sparsity": {"0-2": 0.5}, "attn_sparsity": {"1-2": 0.5}}
NO_CHANNELS = {"ffn_sparsity": 0.0, "attn_sparsity": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small run fastest on one thread (on a busy 2-core machine, 4x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, layers=3, hidden=64)
    return str(path)


def records() -> Dataset:
    """Eight prompt/completion rows of different lengths (so batches are padded)."""
    rows = [
        {"prompt": f"Q: {a} + {a + 3} = ?\nA:", "completion": f" {a} + {a + 3} is {2 * a + 3}." * (1 + a % 3)}
        for a in range(8)
    ]  # fmt: skip
    return Dataset.from_list(rows)


class Seen(TrainerCallback):
    """The kept channels of each optimizer step's last forward (empty when it ran dense)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.selections: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.selections.append(self.handle.last_selection())


def trainer_for(model_dir, tmp_path, packing: bool) -> SFTTrainer:
    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        completion_only_loss=True,
        packing=packing,  # TRL's default "bfd" packing is padding-free: one row, position_ids
        max_length=64,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN + MLP)
    return SFTTrainer(model=model_dir, args=args, train_dataset=records(), peft_config=lora)


def with_sparselora(trainer: SFTTrainer, **fields):
    config = SparseLoRAConfig(estimator="svd", start_step=0.0, **fields)
    handle = apply_sparselora(trainer.model, config, use_cache=False)
    trainer.add_callback(SparseLoRACallback(handle))
    return handle


def logged(trainer: SFTTrainer, key: str) -> list[float]:
    values = [row[key] for row in trainer.state.log_history if key in row and "loss" in row]
    assert len(values) == STEPS
    return values


def first_batch(trainer: SFTTrainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sparsity_engages_under_sft_trainer(model_dir, tmp_path, packing):
    """Channel sparsity runs on every optimizer step, at the configured fractions."""
    trainer = trainer_for(model_dir, tmp_path, packing)
    handle = with_sparselora(trainer, **CHANNELS)
    assert handle.model is trainer.model.get_base_model()  # the model the trainer trains
    assert trainer.args.gradient_checkpointing  # TRL's default: layers rerun in the backward
    batch = first_batch(trainer)
    if packing:  # padding-free: no attention mask, so every token counts as real
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        assert (batch["position_ids"] == 0).sum() > 1  # several records in the row
    else:
        assert (batch["attention_mask"] == 0).any()  # padded
    seen = Seen(handle)
    trainer.add_callback(seen)
    trainer.train()

    window = handle.stats.window()
    kept = {name: value for name, value in window.items() if name.endswith("_kept")}
    assert kept == pytest.approx({"ffn_kept": 0.5, "attn_kept": 0.5}, abs=0.02)
    assert window["flops_saved"] > 0 and window["dense_steps"] == 0
    assert len(seen.selections) == STEPS
    for selection in seen.selections:  # every optimizer step ended on a sparse forward
        assert sorted(selection) == [0, 1, 2]
        assert len(selection[0]["gate_proj"]) == 64  # half of the 128 FFN channels
        assert len(selection[1]["q_proj"]) == 32  # half of the 64 query channels
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_exact_savings_give_lora_loss_under_sft_trainer(model_dir, tmp_path, packing):
    """No channel sparsity, exact savings on: every step's loss, gradient norm and TRL's
    token metrics are LoRA's; the last layer's skipped context tokens are counted."""
    lora = trainer_for(model_dir, tmp_path / "lora", packing)
    lora.train()
    sparse = trainer_for(model_dir, tmp_path / "sparse", packing)
    handle = with_sparselora(sparse, **NO_CHANNELS)
    assert handle.config.labelled_logits and handle.config.skip_unread_last_layer
    sparse.train()

    assert handle.stats.flops_saved > 0  # the last layer skipped its unread rows
    # entropy and token accuracy: TRL's metrics, from its own LM head
    for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy"):
        assert logged(sparse, key) == pytest.approx(logged(lora, key), rel=EXACT), key


def test_trl_lm_head_replaces_labelled_logits(model_dir, tmp_path):
    """SFTTrainer's loss comes from TRL's fused LM head; our labelled-logits head stays
    installed but does not run (nothing counts its skipped positions), so it cannot apply twice.
    A plain forward with labels on the same model takes ours, with the same loss; removing the
    handle leaves TRL's head in place."""
    trainer = trainer_for(model_dir, tmp_path, packing=False)
    handle = with_sparselora(trainer, **NO_CHANNELS, skip_unread_last_layer=False)
    model = trainer.model.train()
    batch = first_batch(trainer)

    trl_loss = trainer.compute_loss(model, dict(batch))
    assert handle.stats.flops_saved == 0  # the only saving on is the head's: it did not run
    outputs = model(**batch)  # no fused_lm_head: transformers' forward, taken over by ours
    read = int((batch["labels"][:, 1:] != -100).sum())
    assert outputs.logits.shape == (read, len(trainer.processing_class))
    assert handle.stats.flops_saved > 0
    assert outputs.loss.item() == pytest.approx(trl_loss.item(), rel=EXACT)
    handle.remove()
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    assert trainer.compute_loss(model, dict(batch)).item() == trl_loss.item()


def test_remove_keeps_trl_head_when_applied_before_the_trainer(model_dir, tmp_path):
    """Applied to the PEFT model before SFTTrainer wraps its forward, our head ends up under
    TRL's; `remove()` must not take TRL's head away with it (ours passes through from then)."""
    reference = trainer_for(model_dir, tmp_path / "ref", packing=False)
    args = reference.args
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN + MLP),
    )
    handle = apply_sparselora(
        model, SparseLoRAConfig(estimator="svd", **NO_CHANNELS), use_cache=False
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=records())
    batch = first_batch(trainer)
    before = trainer.compute_loss(trainer.model.train(), dict(batch)).item()
    handle.remove()
    after = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert after == pytest.approx(before, rel=EXACT)
