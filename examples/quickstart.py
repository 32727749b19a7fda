"""Quickstart: fine-tune SmolLM2-135M-Instruct on GSM8K with LoRA, then with SparseLoRA.

Runs offline on the embedded model and data (see README). Same seed, data and steps for both
methods; prints the training loss and the median step time of each.

    python examples/quickstart.py --steps 8 --batch-size 2 --max-length 192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.recipes.assets import gsm8k_split, load_smollm2


def encode(tokenizer, example: dict, max_length: int) -> tuple[list[int], list[int]]:
    """Chat-formatted question as the prompt (label -100), the worked answer as the response."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": example["question"]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id])[:max_length]
    return ids, labels


def batches(tokenizer, examples, batch_size, max_length):
    for start in range(0, len(examples), batch_size):
        rows = [encode(tokenizer, e, max_length) for e in examples[start : start + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        yield {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
            ),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
        }


def train(method: str, args) -> tuple[list[float], list[float]]:
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2()
    model = get_peft_model(
        model,
        LoraConfig(
            r=32,
            lora_alpha=64,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    if method == "sparselora":
        config = SparseLoRAConfig(
            ffn_sparsity={"4-27": args.ffn_sparsity},
            attn_sparsity={"12-27": args.attn_sparsity},
            start_step=0.0,
            calibration_tokens=1,
        )
        train_rows, _ = gsm8k_split()
        calibration = list(batches(tokenizer, train_rows[-8:], 4, args.max_length))
        apply_sparselora(model, config, calibration=calibration)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    train_rows, _ = gsm8k_split()
    data = list(
        batches(
            tokenizer, train_rows[: args.steps * args.batch_size], args.batch_size, args.max_length
        )
    )
    model.train()
    losses, times = [], []
    for batch in data:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(
            f"  {method:10s} step {len(losses):3d}  loss {losses[-1]:.4f}  {times[-1]:.2f} s",
            flush=True,
        )
    return losses, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--ffn-sparsity", type=float, default=0.5)
    parser.add_argument("--attn-sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {method: train(method, args) for method in ("lora", "sparselora")}
    print("\n| method | mean loss | median step (s) |\n|---|---|---|")
    for method, (losses, times) in results.items():
        print(
            f"| {method} | {statistics.mean(losses):.4f} | {statistics.median(times[1:] or times):.2f} |"
        )
    ratio = statistics.median(results["lora"][1][1:]) / statistics.median(
        results["sparselora"][1][1:]
    )
    print(f"\nSparseLoRA step-time speedup over LoRA: {ratio:.2f}x (first step excluded)")


if __name__ == "__main__":
    main()
