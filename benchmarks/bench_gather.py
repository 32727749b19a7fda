"""The sliced frozen FFN (gate/up rows, down columns), forward + input-gradient backward:
`sparselora.engine.ops` (SlicedLinear: gathers into a reused scratch buffer, saves only indices)
against the plain autograd form (fresh `index_select` copies, kept alive for backward).

Interleaved A/B repeats, medians; also the bytes autograd saves for backward in one forward.

    python benchmarks/bench_gather.py --hidden 4096 --intermediate 14336 --tokens 384 --keep 0.1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparselora.engine import ops


def plain_rows(x, w, rows):
    return F.linear(x, w.index_select(0, rows))


def plain_cols(x, w, cols):
    return F.linear(x, w.index_select(1, cols))


def ffn(x, gate, up, down, keep, rows_fn, cols_fn):
    h = F.silu(rows_fn(x, gate, keep)) * rows_fn(x, up, keep)
    return cols_fn(h, down, keep)


def saved_bytes(fn, existing) -> int:
    """Bytes of the tensors autograd saves that did not exist before (weights, inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in existing}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--tokens", type=int, default=384, help="sparse tokens per call")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.1, 0.01])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, i = args.hidden, args.intermediate
    gate, up, down = torch.randn(i, h) * 0.02, torch.randn(i, h) * 0.02, torch.randn(h, i) * 0.02
    x = torch.randn(args.tokens, h, requires_grad=True)
    grad = torch.randn(args.tokens, h)
    variants = {
        "plain": (plain_rows, plain_cols),
        "sliced": (
            lambda x, w, r: ops.rows_linear(x, w, None, r),
            lambda x, w, c: ops.cols_linear(x, w, None, c),
        ),
    }
    print(f"| keep | plain ms | sliced ms | sliced/plain | plain saved MiB | sliced saved MiB |"
          f"  (H={h}, I={i}, {args.tokens} tokens, {args.threads} threads)")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for fraction in args.keep:
        keep = torch.randperm(i)[: max(1, int(i * fraction))].sort().values
        times = {name: [] for name in variants}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, (rows_fn, cols_fn) in variants.items():
                start = time.perf_counter()
                y = ffn(x, gate, up, down, keep, rows_fn, cols_fn)
                y.backward(grad)
                times[name].append(time.perf_counter() - start)
                x.grad = None
        med = {name: 1000 * statistics.median(t[1:]) for name, t in times.items()}
        saved = {
            name: saved_bytes(
                lambda f=fns, k=keep: ffn(x, gate, up, down, k, *f), (x, gate, up, down)
            )
            / 2**20
            for name, fns in variants.items()
        }
        print(
            f"| {fraction:g} | {med['plain']:.1f} | {med['sliced']:.1f} | "
            f"{med['sliced'] / med['plain']:.3f} | {saved['plain']:.1f} | {saved['sliced']:.1f} |"
        )


if __name__ == "__main__":
    main()
