"""Measured effect of each exact saving alone (no channel sparsity), end to end.

Runs `sparselora bench` (same model, batch, A B B A pairs) for four SparseLoRA configs with
no sparse layer: both savings off (must match LoRA: the wrapping's own overhead), only
`labelled_logits`, only `skip_unread_last_layer`, both. Prints one markdown row per variant:
measured speedup over PEFT LoRA beside the FLOPs-predicted one.

    python benchmarks/exact_savings.py --shape 512,128 --batch-size 2 --steps 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sparselora import SparseLoRAConfig
from sparselora.perf.bench import BenchConfig, run_benchmark

VARIANTS = {
    "none (wrapping only)": (False, False),
    "labelled logits": (True, False),
    "last-layer K/V only": (False, True),
    "both": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--shape", default="512,128")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    print(
        "| saving | LoRA s | SparseLoRA s | measured speedup | paired | predicted "
        "| paired/predicted |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (logits, last) in VARIANTS.items():
            path = Path(tmp) / "config.yaml"
            SparseLoRAConfig(labelled_logits=logits, skip_unread_last_layer=last).save(path)
            config = BenchConfig(
                model=args.model,
                random_weights=args.random_weights,
                sparselora=str(path),
                shapes=[args.shape],
                padding=["none"],
                batch_size=args.batch_size,
                warmup_steps=args.warmup,
                steps=args.steps,
                threads=args.threads,
                device="cpu",
            )
            row = run_benchmark(config).rows[0]
            print(
                f"| {name} | {row.lora.median_s:.3f} | {row.sparselora.median_s:.3f} | "
                f"{row.speedup:.3f}x | {row.paired_speedup:.3f}x | "
                f"{row.predicted_speedup:.3f}x | "
                f"{row.paired_speedup / row.predicted_speedup:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
