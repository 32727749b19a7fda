"""How a sparse block lays out its GEMMs: the variants of issue 14, timed against each other.

One forward + backward (input gradient; LoRA weight gradients too) of a sparse FFN or of one
sparse attention projection with a dense LoRA branch, on a micro-batch whose tokens are split
into a sparse (context) set and a dense (answer) set, written with `sparselora.engine.ops`:

FFN (frozen gate, up, down; no LoRA on the MLP, the paper's setting)
  split:        per token set: sparse tokens through the kept channels (gate and up as two
                sliced GEMMs), dense tokens through the whole FFN, merged by a row permutation
  split+stack:  the same, gate and up as ONE sliced GEMM over their stacked kept rows
  split+stack+Tf: and the dense tokens' GEMMs as (W x^T)^T, autograd's own backward (the
                layout of the first `ops.frozen_linear`)
  split+stack+T: and through `ops.frozen_linear` as it is: backward as (W^T g^T)^T too, or,
                for fewer than `ops.SKINNY_ROWS` dense rows on a large weight (the 3 of
                llama3-8b-csr), as `ops.blocked_input_grad`
  all+rest:     kept channels for ALL tokens in one GEMM (gate and up stacked), the remaining
                channels for the dense tokens only; no permutation, but the remaining rows of
                each weight are gathered (most of the weight at high sparsity)
Attention projection (frozen q_proj with LoRA r on every token)
  split:        sparse tokens: kept rows + LoRA; dense tokens: the whole module + LoRA; merged
  split+lora1:  the frozen part per token set, the LoRA branch once over all tokens
  split+lora1+T: and the dense tokens' GEMM through `ops.frozen_linear`
  split+T:      split, with the dense tokens' frozen GEMM through `ops.frozen_linear` (the
                engine's layout since the transposed backward)
  split+T+add:  and the sparse tokens' kept rows added into their LoRA delta (index_add)
                instead of scattered into zeros and then added
  all+rest:     kept rows for all tokens, remaining rows for the dense tokens, LoRA once

Variants run interleaved (V1 V2 V3 V3 V2 V1 ...), medians and paired ratios against `split`.

    python benchmarks/bench_sparse_gemms.py --model llama3-8b
    python benchmarks/bench_sparse_gemms.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparselora.engine import ops

MODELS = {  # hidden, intermediate, q width, kept FFN, kept q, tokens, dense tokens
    "llama3-8b": (4096, 14336, 4096, 143, 1024, 512, 128),  # llama3-8b-math10k, math shape
    "llama3-8b-csr": (4096, 14336, 4096, 430, 3276, 512, 3),  # llama3-8b-csr, commonsense
    "smollm2-135m": (576, 1536, 576, 153, 288, 2048, 512),
    "tiny": (128, 192, 128, 24, 64, 64, 20),  # the test's: 20 dense rows, 6-10 outputs per row
}


def rel_err(y: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error: the variants compute the same values up to float rounding."""
    return float((y - reference).norm() / reference.norm())


def check_variants(variants, x: torch.Tensor) -> None:
    """Every variant's output and input gradient equal `split`'s up to float rounding."""
    results = {}
    for name, fn in variants.items():
        xi = x.detach().requires_grad_(True)
        y = fn(xi)
        (grad,) = torch.autograd.grad(y, xi, torch.ones_like(y))
        results[name] = (y.detach(), grad)
    for name, (y, grad) in results.items():
        assert rel_err(y, results["split"][0]) < 1e-5, f"{name}: output"
        assert rel_err(grad, results["split"][1]) < 1e-5, f"{name}: input gradient"


def token_sets(n: int, n_dense: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last n_dense / batch tokens of each row dense, like the math shape."""
    per_row = n // batch
    dense = torch.zeros(batch, per_row, dtype=torch.bool)
    dense[:, per_row - n_dense // batch :] = True
    dense = dense.reshape(-1)
    return (~dense).nonzero().squeeze(1), dense.nonzero().squeeze(1)


def merge(y_sparse, y_dense, sparse_rows, dense_rows):
    order = torch.cat([sparse_rows, dense_rows])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return torch.cat([y_sparse, y_dense]).index_select(0, inverse)


def frozen_layer(weight: torch.Tensor) -> torch.nn.Linear:
    """A bias-free nn.Linear sharing `weight` (frozen)."""
    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def ffn_variants(w_gate, w_up, w_down, keep, rest, sparse_rows, dense_rows):
    layers = {id(w): frozen_layer(w) for w in (w_gate, w_up, w_down)}

    def transposed_linear(x, weight):  # as the engine runs the dense tokens' GEMMs
        return ops.frozen_linear(x, layers[id(weight)])

    def transposed_forward(x, weight):  # the first frozen_linear: autograd's backward of mm
        return torch.mm(weight, x.t()).t()

    def split(x, stacked, linear=F.linear):
        xs, xd = x.index_select(0, sparse_rows), x.index_select(0, dense_rows)
        if stacked:
            g, u = ops.stacked_rows_linear(xs, ((w_gate, None, keep), (w_up, None, keep))).split(
                keep.numel(), 1
            )
        else:
            g = ops.rows_linear(xs, w_gate, None, keep)
            u = ops.rows_linear(xs, w_up, None, keep)
        ys = ops.cols_linear(F.silu(g) * u, w_down, None, keep)
        yd = linear(F.silu(linear(xd, w_gate)) * linear(xd, w_up), w_down)
        return merge(ys, yd, sparse_rows, dense_rows)

    def all_rest(x):
        g, u = ops.stacked_rows_linear(x, ((w_gate, None, keep), (w_up, None, keep))).split(
            keep.numel(), 1
        )
        y = ops.cols_linear(F.silu(g) * u, w_down, None, keep)
        xd = x.index_select(0, dense_rows)
        g, u = ops.stacked_rows_linear(xd, ((w_gate, None, rest), (w_up, None, rest))).split(
            rest.numel(), 1
        )
        return y.index_add(0, dense_rows, ops.cols_linear(F.silu(g) * u, w_down, None, rest))

    return {
        "split": lambda x: split(x, False),
        "split+stack": lambda x: split(x, True),
        "split+stack+Tf": lambda x: split(x, True, transposed_forward),
        "split+stack+T": lambda x: split(x, True, transposed_linear),
        "all+rest": all_rest,
    }


def projection_variants(weight, lora_a, lora_b, keep, rest, sparse_rows, dense_rows):
    out = weight.shape[0]
    layer = frozen_layer(weight)

    def lora(x):
        return F.linear(F.linear(x, lora_a), lora_b) * 2.0

    def plain(xd):
        return F.linear(xd, weight)

    def transposed(xd):
        return ops.frozen_linear(xd, layer)

    def split(x, dense=plain, add_into_delta=False):
        """LoRA per token set; the sparse tokens' kept rows scattered into zeros and added to
        their delta, or (`add_into_delta`) index_added into it: no zeros, one pass less."""
        xs, xd = x.index_select(0, sparse_rows), x.index_select(0, dense_rows)
        kept = ops.rows_linear(xs, weight, None, keep)
        if add_into_delta:
            ys = lora(xs).index_add(1, keep, kept)
        else:
            ys = ops.scatter_channels(kept, keep, out) + lora(xs)
        return merge(ys, dense(xd) + lora(xd), sparse_rows, dense_rows)

    def split_lora_once(x, dense=plain):
        xs, xd = x.index_select(0, sparse_rows), x.index_select(0, dense_rows)
        ys = ops.scatter_channels(ops.rows_linear(xs, weight, None, keep), keep, out)
        return merge(ys, dense(xd), sparse_rows, dense_rows) + lora(x)

    def all_rest(x):
        y = ops.scatter_channels(ops.rows_linear(x, weight, None, keep), keep, out)
        yd = ops.rows_linear(x.index_select(0, dense_rows), weight, None, rest)
        y = y.index_put((dense_rows[:, None], rest[None, :]), yd)
        return y + lora(x)

    return {
        "split": split,
        "split+lora1": split_lora_once,
        "split+lora1+T": lambda x: split_lora_once(x, transposed),
        "split+T": lambda x: split(x, transposed),
        "split+T+add": lambda x: split(x, transposed, add_into_delta=True),
        "all+rest": all_rest,
    }


def time_variants(variants, x, repeats: int) -> dict[str, list[float]]:
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(repeats + 1):
        for name in names if r % 2 == 0 else reversed(names):
            xi = x.detach().requires_grad_(True)
            start = time.perf_counter()
            y = variants[name](xi)
            y.backward(torch.ones_like(y))
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return times


def report(title, times):
    base = times["split"]
    print(f"\n{title}")
    print("| variant | median ms | paired ratio split/variant |")
    print("|---|---|---|")
    for name, values in times.items():
        paired = statistics.median(b / v for b, v in zip(base, values, strict=True))
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {paired:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, inter, q_width, ffn_kept, q_kept, n, n_dense = MODELS[args.model]
    batch = 1 if n == 512 else 4
    sparse_rows, dense_rows = token_sets(n, n_dense, batch)
    x = torch.randn(n, hidden)
    w_gate, w_up = torch.randn(inter, hidden) * 0.02, torch.randn(inter, hidden) * 0.02
    w_down = torch.randn(hidden, inter) * 0.02
    perm = torch.randperm(inter)
    keep, rest = perm[:ffn_kept].sort().values, perm[ffn_kept:].sort().values
    ffn = ffn_variants(w_gate, w_up, w_down, keep, rest, sparse_rows, dense_rows)
    check_variants(ffn, x)
    print(f"{args.model}: {n} tokens ({n_dense} dense), {args.threads} threads, "
          f"{args.repeats} interleaved repeats")  # fmt: skip
    report(f"FFN, keep {ffn_kept}/{inter}", time_variants(ffn, x, args.repeats))
    w_q = torch.randn(q_width, hidden) * 0.02
    lora_a = torch.randn(32, hidden, requires_grad=True)
    lora_b = torch.randn(q_width, 32, requires_grad=True)
    perm = torch.randperm(q_width)
    keep, rest = perm[:q_kept].sort().values, perm[q_kept:].sort().values
    proj = projection_variants(w_q, lora_a, lora_b, keep, rest, sparse_rows, dense_rows)
    check_variants(proj, x)
    report(f"q_proj + LoRA r32, keep {q_kept}/{q_width}", time_variants(proj, x, args.repeats))


if __name__ == "__main__":
    main()
