"""TRL: fine-tune SmolLM2-135M-Instruct on GSM8K with TRL's SFTTrainer and SparseLoRA.

Runs offline on the embedded model and data (see README). TRL builds the LoRA model from
`peft_config`; SparseLoRA is applied to the model the trainer then holds, and its callback
follows the preset's start_step / end_step. The loss is on the answers only (prompt/completion
records). TRL prints its log rows (loss, token accuracy); the script then prints what SparseLoRA
kept and saved.

    python examples/trl_sft.py --steps 3 --max-length 128
    python examples/trl_sft.py --steps 3 --max-length 128 --method lora   # the same, plain LoRA
"""

from __future__ import annotations

import argparse
import itertools

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sparselora import SparseLoRACallback, apply_sparselora, get_preset
from sparselora.recipes.assets import load_smollm2
from sparselora.recipes.records import load_records

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gsm8k_dataset(count: int) -> Dataset:
    """TRL's conversational prompt/completion rows: the question as the user's message, the
    worked solution as the assistant's."""
    rows = load_records("gsm8k:train")[:count]
    return Dataset.from_list(
        [
            {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["response"]}]}
            for r in rows
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per record")
    parser.add_argument("--packing", action="store_true", help="TRL's padding-free packing")
    parser.add_argument("--method", choices=["sparselora", "lora"], default="sparselora")
    parser.add_argument("--preset", default="smollm2-135m-gsm8k", help="SparseLoRA preset")
    parser.add_argument("--output-dir", default="runs/trl_sft")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    dataset = gsm8k_dataset(args.steps * args.batch_size * args.grad_accum)
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        packing=args.packing,
        learning_rate=3e-4,
        bf16=torch.cuda.is_available(),  # fp32 on the CPU
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    lora = LoraConfig(
        r=32,
        lora_alpha=64,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )

    handle = None
    if args.method == "sparselora":
        # Apply to the model the trainer trains, after SFTTrainer has added LoRA (and its own LM
        # head). The whitened estimator calibrates on two training batches, before step 1.
        calibration = itertools.islice(trainer.get_train_dataloader(), 2)
        handle = apply_sparselora(trainer.model, get_preset(args.preset), calibration=calibration)
        trainer.add_callback(SparseLoRACallback(handle))

    result = trainer.train()
    print(f"\n{args.method}: {result.metrics['train_runtime']:.1f} s for {args.steps} steps")
    if handle is not None:
        stats = handle.stats.window()
        kept = {k: round(v, 3) for k, v in stats.items() if k.endswith("_kept")}
        print(f"kept fractions {kept}, {stats['flops_saved'] / 1e12:.2f} TFLOPs saved")


if __name__ == "__main__":
    main()
