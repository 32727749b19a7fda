"""One rank of the 2-process DDP test (run by tests/engine/test_ddp.py through torch.distributed.run)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ATTN, MLP, lora_model, make_batch, tiny_llama  # noqa: E402

from sparselora import SparseLoRACallback, SparseLoRAConfig, apply_sparselora  # noqa: E402


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    model = lora_model(tiny_llama(), ATTN + MLP)  # same seed on both ranks
    config = SparseLoRAConfig(
        ffn_sparsity=0.5, attn_sparsity={"1-2": 0.5}, start_step=0.25, calibration_tokens=16
    )
    handle = apply_sparselora(model, config, use_cache=False)
    batch = make_batch(batch=4, length=12, seed=3 + rank)  # each rank its own data
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)] * 4
    args = TrainingArguments(
        output_dir=str(out / f"trainer{rank}"),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[SparseLoRACallback(handle)]
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(weights, out / f"rank{rank}.pt")
    sparse_layers = sorted(handle.last_selection())
    (out / f"rank{rank}.json").write_text(
        json.dumps({"losses": losses, "sparse_layers": sparse_layers})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
