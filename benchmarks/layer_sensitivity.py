"""Layer sensitivity on GSM8K: held-out loss with ONE layer sparse (default: the embedded
SmolLM2-135M-Instruct; `--model gemma3-270m` or any supported model).

This is how the paper chose its presets (one-layer-at-a-time sweeps on a proxy task), made
automatic. Context tokens are sparse, answer tokens dense, as in training; the loss is the
response-token cross-entropy of held-out GSM8K problems (dense model, no adapter).

    python benchmarks/layer_sensitivity.py --examples 24 --csv docs/layer_sensitivity.csv
    python benchmarks/layer_sensitivity.py --model gemma3-270m --examples 32 --attn "" \
        --csv docs/layer_sensitivity_gemma3.csv
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.recipes.data import Collator, tokenize_records
from sparselora.recipes.loading import EMBEDDED_MODEL, load_model, load_tokenizer
from sparselora.recipes.records import load_records


def batches_of(examples, collator, size):
    return [collator(examples[i : i + size]) for i in range(0, len(examples), size)]


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    """Token-weighted response cross-entropy; labels go to the model so context runs sparse."""
    total, tokens = 0.0, 0
    for batch in batches:
        out = model(**batch)
        count = int((batch["labels"][:, 1:] != -100).sum())
        total += out.loss.item() * count
        tokens += count
    return total / tokens


def sparse_loss(model, config, estimator, batches) -> float:
    handle = apply_sparselora(model, config, estimator=estimator, use_cache=False)
    try:
        return heldout_loss(model, batches)
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="embedded name, hub id or dir")
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--ffn", default="0.5,0.75,0.9", help="FFN sparsities to sweep")
    parser.add_argument("--attn", default="0.5,0.75", help="attention sparsities to sweep")
    parser.add_argument("--csv", default="docs/layer_sensitivity.csv")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = load_model(args.model, "float32").eval()
    tokenizer = load_tokenizer(args.model)
    collator = Collator(tokenizer.pad_token_id)
    heldout, _ = tokenize_records(
        load_records("gsm8k:eval")[: args.examples], tokenizer, args.max_length
    )
    calib, _ = tokenize_records(load_records("gsm8k:train")[:32], tokenizer, args.max_length)
    eval_batches = batches_of(heldout, collator, 4)
    num_layers = model.config.num_hidden_layers

    every = SparseLoRAConfig(
        ffn_sparsity=0.5, attn_sparsity=0.5, sparse_in_eval=True, calibration_tokens=1
    )
    handle = apply_sparselora(
        model, every, calibration=batches_of(calib, collator, 4), use_cache=False
    )
    estimator = handle.estimator
    handle.remove()

    dense = heldout_loss(model, eval_batches)
    print(f"dense held-out loss {dense:.4f}", flush=True)
    rows = []
    for block, levels in (("ffn", args.ffn), ("attn", args.attn)):
        for sparsity in (float(v) for v in levels.split(",") if v):
            for layer in range(num_layers):
                start = time.perf_counter()
                config = SparseLoRAConfig(
                    ffn_sparsity={str(layer): sparsity} if block == "ffn" else {},
                    attn_sparsity={str(layer): sparsity} if block == "attn" else {},
                    sparse_in_eval=True,
                )
                loss = sparse_loss(model, config, estimator, eval_batches)
                rows.append(
                    {"block": block, "sparsity": sparsity, "layer": layer, "loss": loss,
                     "delta_pct": 100 * (loss - dense) / dense}
                )  # fmt: skip
                print(
                    f"{block} s={sparsity} layer {layer:2d}: loss {loss:.4f} "
                    f"({rows[-1]['delta_pct']:+.2f}%) {time.perf_counter() - start:.1f}s",
                    flush=True,
                )
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle_file:
        writer = csv.DictWriter(handle_file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"dense {dense:.4f}; wrote {path}")


if __name__ == "__main__":
    main()
