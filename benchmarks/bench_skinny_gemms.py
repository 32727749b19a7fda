"""Few rows on a large frozen weight: the products `ops.frozen_linear` chooses between.

With a handful of rows (the 3 dense tokens of a commonsense batch, the LM head on 3 read
positions) a product of x (n, in) with a frozen W (out, in) only streams W from memory. This
times, for each weight shape and row count, the forward x W^T against (W x^T)^T and the input
gradient g W against (W^T g^T)^T and `ops.blocked_input_grad`, interleaved, and prints the
median milliseconds and the rate at which each reads W (GB/s), beside a plain read of W
(`W.sum()`) for the memory bandwidth. Each variant is checked against x W^T / g W first.

    python benchmarks/bench_skinny_gemms.py                 # the 8B shapes, 1-64 rows
    python benchmarks/bench_skinny_gemms.py --shapes 576x576 1536x576 --rows 3 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparselora.engine import ops

SHAPES_8B = ["14336x4096", "4096x14336", "4096x4096", "1024x4096", "128256x4096"]


def variants(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> dict:
    return {
        "fwd x W^T": lambda: x @ weight.t(),
        "fwd (W x^T)^T": lambda: (weight @ x.t()).t(),
        "bwd g W": lambda: g @ weight,
        "bwd (W^T g^T)^T": lambda: (weight.t() @ g.t()).t(),
        "bwd blocked": lambda: ops.blocked_input_grad(g, weight),
        "read W (sum)": lambda: weight.sum(),
    }


def check(fns: dict, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> None:
    forward, backward = x @ weight.t(), g @ weight
    for name, fn in fns.items():
        expected = forward if name.startswith("fwd") else backward
        if not name.startswith("read"):
            err = float((fn() - expected).norm() / expected.norm())
            assert err < 1e-5, f"{name}: relative error {err:.1e}"


def measure(fns: dict, repeats: int, slow: set[str]) -> dict[str, list[float]]:
    """Interleaved repeats (order reversed every other round), after one warm-up each; a
    variant in `slow` runs once (the (W^T g^T)^T product can take seconds at few rows)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for name in names:
        fns[name]()
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            if name in slow and times[name]:
                continue
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES_8B, help="OUTxIN weight shapes")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 3, 8, 16, 31, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {args.repeats} interleaved repeats, float32; ms (GB/s of W)")
    print(
        f"skinny rule: fewer than {ops.SKINNY_ROWS} rows on at least {ops.SKINNY_MIN_WEIGHT} "
        "weight elements"
    )
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        out, inp = (int(v) for v in shape.split("x"))
        weight = torch.randn(out, inp, generator=generator)
        gigabytes = weight.numel() * weight.element_size() / 1e9
        print(f"\nW {shape} ({gigabytes * 1e3:.0f} MB)")
        header = None
        for rows in args.rows:
            x = torch.randn(rows, inp, generator=generator)
            g = torch.randn(rows, out, generator=generator)
            fns = variants(x, g, weight)
            check(fns, x, g, weight)
            # (W^T g^T)^T is 10-100x slower below ~16 rows: time it once there
            slow = {"bwd (W^T g^T)^T"} if rows < ops.TRANSPOSED_MIN_ROWS else set()
            times = measure(fns, args.repeats, slow)
            if header is None:
                header = "| rows | " + " | ".join(fns) + " |"
                print(header)
                print("|---" * (len(fns) + 1) + "|")
            cells = []
            for name in fns:
                ms = statistics.median(times[name]) * 1e3
                cells.append(f"{ms:.1f} ({gigabytes / ms * 1e3:.1f})")
            print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
