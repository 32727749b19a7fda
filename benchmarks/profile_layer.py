"""Profile one decoder layer of each kind (the composed benchmark's parts) with torch.profiler.

Where does a sparse layer's time go, against the dense layer's and against its FLOPs? Prints,
per kind and method, the self time of the top operators of one forward + backward (after a
warm-up), so the excess over the FLOPs prediction can be attributed.

    python benchmarks/profile_layer.py --model llama3-8b --preset llama3-8b-math10k --shape math
    python benchmarks/profile_layer.py --part "FFN 0.99 + attn 0.75" --gemm-shapes
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from sparselora.perf.common import parse_shape
from sparselora.perf.composed import ComposedConfig
from sparselora.perf.parts import PartsModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--preset", default="llama3-8b-math10k")
    parser.add_argument("--shape", default="math")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument(
        "--gemm-shapes",
        action="store_true",
        help="also list every matmul shape with its time and GFLOP/s",
    )
    parser.add_argument(
        "--by-shape",
        action="store_true",
        help="also list the top non-matmul operators per input shape",
    )
    parser.add_argument("--part", help="only the layer part with this label, e.g. 'dense'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ComposedConfig(
        model=args.model, sparselora=args.preset, shapes=[args.shape], estimator="svd"
    )
    sparse = config.sparse_config()
    model = PartsModel(config, sparse, config.model_shape(), torch.device("cpu"), torch.float32)
    for part in model.parts(parse_shape(args.shape)):
        if part.part != "layer" or args.part not in (None, part.label.removeprefix("layer: ")):
            continue
        for method in ("lora", "sparselora"):
            mode = model.handle.dense() if method == "lora" else contextlib.nullcontext()
            with mode:
                part.reset()
                part.run()  # warm-up
                part.reset()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    part.run()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events) / 1e3
            print(f"\n## {part.label} ({method}): {total:.0f} ms of operator self time")
            for event in events[: args.top]:
                print(f"  {event.self_cpu_time_total / 1e3:9.1f} ms  {event.count:5d}  {event.key}")
            if args.gemm_shapes:
                print_gemm_shapes(prof)
            if args.by_shape:
                print_op_shapes(prof, args.top)
    model.remove()


def print_gemm_shapes(prof) -> None:
    """Each aten::mm shape (M x K @ K x N): self time, calls and achieved GFLOP/s."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::mm" or len(event.input_shapes) < 2:
            continue
        (m, k), (_, n) = event.input_shapes[:2]
        ms = event.self_cpu_time_total / 1e3
        gflops = 2 * m * k * n * event.count / ms / 1e6 if ms else 0.0
        rows.append((ms, event.count, f"{m}x{k} @ {k}x{n}", gflops))
    print(f"  matmul shapes ({sum(r[0] for r in rows):.0f} ms):")
    for ms, count, shape, gflops in sorted(rows, reverse=True):
        print(f"  {ms:9.1f} ms  {count:5d}  {shape:26s} {gflops:5.0f} GFLOP/s")


def print_op_shapes(prof, top: int) -> None:
    """The non-matmul operators with the most self time, one row per input shape."""
    events = [
        e
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key.startswith("aten::") and e.key != "aten::mm"
    ]
    print("  other operators by input shape:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        shapes = ", ".join("x".join(map(str, s)) for s in event.input_shapes if s)
        ms = event.self_cpu_time_total / 1e3
        print(f"  {ms:9.1f} ms  {event.count:5d}  {event.key:28s} {shapes}")


if __name__ == "__main__":
    main()
