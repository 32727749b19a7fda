"""Choose a SmolLM2 preset from the one-layer sensitivity sweep (layer_sensitivity.py).

Rule (documented in docs/SMOLLM2_PRESET.md): a layer's FFN gets the highest sparsity whose
one-layer held-out loss increase is within its budget (0.9: 1.0%, 0.5: 0.5%); attention layers
get 0.5 within 0.5%. Then the combined preset is measured, and while its loss increase exceeds
--target, the layer with the largest one-layer increase is made dense again.

    python benchmarks/choose_preset.py --csv docs/layer_sensitivity.csv --target 3.0
    python benchmarks/choose_preset.py --blocks ffn --target 0.5   # FFN only, tighter budget
    python benchmarks/choose_preset.py --examples 64 --measure '{"23-29": 0.9}' ...
"""

from __future__ import annotations

import argparse
import csv
import json

import torch
from layer_sensitivity import batches_of, heldout_loss, sparse_loss

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.recipes.assets import load_smollm2
from sparselora.recipes.data import Collator, tokenize_records
from sparselora.recipes.records import load_records

BUDGETS = {"ffn": {0.9: 1.0, 0.5: 0.5}, "attn": {0.5: 0.5}}


def candidates(rows) -> dict[str, dict[int, tuple[float, float]]]:
    """{block: {layer: (sparsity, one-layer delta %)}} under the budgets."""
    chosen: dict[str, dict[int, tuple[float, float]]] = {"ffn": {}, "attn": {}}
    for block, budget in BUDGETS.items():
        for sparsity in sorted(budget, reverse=True):
            for row in rows:
                layer, delta = int(row["layer"]), float(row["delta_pct"])
                if row["block"] != block or float(row["sparsity"]) != sparsity:
                    continue
                if layer not in chosen[block] and delta <= budget[sparsity]:
                    chosen[block][layer] = (sparsity, delta)
    return chosen


def to_spec(layers: dict[int, tuple[float, float]]) -> dict[str, float]:
    """{layer: (s, _)} -> {"a-b": s} with ranges of consecutive layers of equal sparsity."""
    spec: dict[str, float] = {}
    run: list[int] = []
    for layer in sorted(layers) + [None]:
        if run and (layer is None or layer != run[-1] + 1 or layers[layer][0] != layers[run[0]][0]):
            key = str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
            spec[key] = layers[run[0]][0]
            run = []
        if layer is not None:
            run.append(layer)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default="docs/layer_sensitivity.csv")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--target", type=float, default=3.0, help="max combined loss increase, %")
    parser.add_argument("--blocks", default="ffn,attn", help="which blocks may be sparse")
    parser.add_argument(
        "--measure",
        nargs="+",
        metavar="JSON",
        help="only measure these FFN sparsity specs, e.g. '{\"23-29\": 0.9}', and exit",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    with open(args.csv) as handle_file:
        rows = list(csv.DictReader(handle_file))
    chosen = candidates(rows)
    for block in chosen:
        if block not in args.blocks.split(","):
            chosen[block] = {}

    model, tokenizer = load_smollm2()
    model.eval()
    collator = Collator(tokenizer.pad_token_id)
    heldout, _ = tokenize_records(load_records("gsm8k:eval")[: args.examples], tokenizer, 256)
    calib, _ = tokenize_records(load_records("gsm8k:train")[:32], tokenizer, 256)
    batches = batches_of(heldout, collator, 4)
    every = SparseLoRAConfig(ffn_sparsity=0.5, attn_sparsity=0.5, sparse_in_eval=True)
    handle = apply_sparselora(
        model, every, calibration=batches_of(calib, collator, 4), use_cache=False
    )
    estimator = handle.estimator
    handle.remove()
    dense = heldout_loss(model, batches)
    if args.measure:
        print(f"dense held-out loss {dense:.4f} on {args.examples} problems")
        for spec in args.measure:
            config = SparseLoRAConfig(ffn_sparsity=json.loads(spec), sparse_in_eval=True)
            delta = 100 * (sparse_loss(model, config, estimator, batches) - dense) / dense
            print(f"ffn {spec}: {delta:+.2f}%", flush=True)
        return

    while True:
        config = SparseLoRAConfig(
            ffn_sparsity=to_spec(chosen["ffn"]),
            attn_sparsity=to_spec(chosen["attn"]),
            sparse_in_eval=True,
        )
        delta = 100 * (sparse_loss(model, config, estimator, batches) - dense) / dense
        print(
            f"combined: {json.dumps(config.ffn_sparsity)} / {json.dumps(config.attn_sparsity)}: {delta:+.2f}%"
        )
        if delta <= args.target:
            break
        block, layer = max(
            ((b, layer) for b in chosen for layer in chosen[b]),
            key=lambda bl: chosen[bl[0]][bl[1]][1],
        )
        print(f"  dropping {block} layer {layer} (one-layer {chosen[block][layer][1]:+.2f}%)")
        del chosen[block][layer]
    print(
        json.dumps(
            {
                "ffn_sparsity": config.ffn_sparsity,
                "attn_sparsity": config.attn_sparsity,
                "delta_pct": delta,
            }
        )
    )


if __name__ == "__main__":
    main()
