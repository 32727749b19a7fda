"""Profile one LoRA and one SparseLoRA training step (torch.profiler) and say where time goes.

Same model, batch and steps as `sparselora bench` (its loader, LoRA + SparseLoRA set-up,
synthetic batch and StepRunner).
Operator self-times are grouped into matmuls, gathers/scatters, copies/concatenation, attention,
elementwise and other, and the estimator (channel selection) is reported from the handle's own
timer. Prints a markdown table of seconds per group and method, and the top operators.

    python benchmarks/profile_step.py --shape 512,128 --batch-size 4 --repeats 3
    python benchmarks/profile_step.py --model DIR --random-weights --preset NAME ...
    python benchmarks/profile_step.py --load-in-4bit ...   (QLoRA: dequantization is a group)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sparselora.perf.bench import BenchConfig, StepRunner
from sparselora.perf.common import add_lora_and_sparselora, parse_shape, synthetic_batch

GROUPS = {
    "dequantize (4-bit)": ("bitsandbytes::dequantize",),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "gather/scatter": ("aten::index_select", "aten::index_copy", "aten::index", "aten::index_put"),
    "copy/cat": ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::zeros",
                 "aten::new_zeros", "aten::empty", "aten::fill_", "aten::zero_"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "elementwise": ("aten::mul", "aten::add", "aten::silu", "aten::sub", "aten::div", "aten::pow",
                    "aten::rsqrt", "aten::mean", "aten::neg", "aten::exp", "aten::sum",
                    "aten::_log_softmax", "aten::nll_loss", "aten::sigmoid", "aten::where"),
}  # fmt: skip


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if any(name.startswith(p) for p in prefixes):
            return group
    return "other"


def profile_step(runner: StepRunner, method: str, batch) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = runner.step(method, batch)
    groups: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        groups[group_of(event.key)] += seconds
        ops.append((seconds, event.key, event.count))
    ops.sort(reverse=True)
    return {"step_s": result.seconds, "estimator_s": result.estimator_seconds,
            "groups": dict(groups), "top": ops[:12]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA (bitsandbytes nf4)")
    parser.add_argument("--preset", default="smollm2-135m-gsm8k")
    parser.add_argument("--shape", default="512,128")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    config = BenchConfig(
        model=args.model,
        random_weights=args.random_weights,
        load_in_4bit=args.load_in_4bit,
        sparselora=args.preset,
        shapes=[args.shape],
        batch_size=args.batch_size,
        device="cpu",
        dtype="float32",
    )
    shape = parse_shape(args.shape)
    model = config.base_model(cpu)
    vocab = model.config.vocab_size
    model, handle, _ = add_lora_and_sparselora(
        model, config, config.sparse_config(), vocab, shape, cpu
    )
    runner = StepRunner(model, handle, config.learning_rate, cpu)
    batch = synthetic_batch(vocab, args.batch_size, shape, "none", config.seed)
    for method in ("lora", "sparselora"):  # warm-up
        runner.step(method, batch)
    runs = {"lora": [], "sparselora": []}
    for _ in range(args.repeats):
        for method in runs:
            runs[method].append(profile_step(runner, method, batch))

    names = [
        "dequantize (4-bit)",
        "matmul",
        "gather/scatter",
        "copy/cat",
        "attention",
        "elementwise",
        "other",
    ]
    print(f"| group | LoRA s | SparseLoRA s |  ({args.model}, {args.preset}, B={args.batch_size}, "
          f"{args.shape}, medians of {args.repeats})")  # fmt: skip
    print("|---|---|---|")
    for name in names:
        med = {m: statistics.median(r["groups"].get(name, 0.0) for r in runs[m]) for m in runs}
        print(f"| {name} | {med['lora']:.3f} | {med['sparselora']:.3f} |")
    for key, title in (("estimator_s", "estimator (handle timer)"), ("step_s", "step (wall)")):
        med = {m: statistics.median(r[key] for r in runs[m]) for m in runs}
        print(f"| {title} | {med['lora']:.3f} | {med['sparselora']:.3f} |")
    for method in runs:
        print(f"\ntop operators, {method} (last profiled step): self seconds, calls")
        for seconds, name, count in runs[method][-1]["top"]:
            print(f"  {seconds:8.4f}  {count:6d}  {name}")
    if args.json:
        with open(args.json, "w") as handle_file:
            json.dump(runs, handle_file, indent=1)


if __name__ == "__main__":
    main()
