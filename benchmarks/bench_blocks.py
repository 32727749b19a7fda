"""Forward+backward time of one sparsified MLP block and one attention block, sparse vs dense.

For each layer shape a 1-layer LlamaForCausalLM (random float32 weights, vocabulary 128) gets
PEFT LoRA r=32 on q/k/v/o (the paper's setting) and SparseLoRA on layer 0 with FFN and attention
sparsity 1 - keep. One micro-batch of 1 x T tokens, all context (labels -100), so every token
runs sparse. Timed per call: forward of the block on x (1, T, H) with requires_grad (so the input
gradient through the frozen weights is computed, as in training), loss = (y * w).sum(), backward.

- MLP block: `layers[0].mlp`.
- Attention block: `layers[0].self_attn` (q/k/v/o projections with their LoRA, RoPE and the
  attention core), called with the model's rotary embeddings and a causal mask; the residual
  and the norms are not part of it.
- Dense: the same module under `handle.dense()`. Sparse times include channel selection.
- Estimator: `SparseBlock._choose_ffn` / `_choose_attention` alone (the selection one sparse
  forward runs), reported as a share of the dense fwd+bwd time of the same block. Its factors
  are rank-8 SVD factors of the weights from a randomized SVD (`torch.svd_lowrank`): an exact
  SVD of an 8B FFN weight takes minutes on two cores, and the per-step cost of the estimator
  depends only on its rank, not on how the factors were computed.

Dense and sparse calls alternate after a warm-up; medians of wall time are reported. Rows go to
a CSV and a markdown table is printed.

    python benchmarks/bench_blocks.py --shapes smollm2,llama3-8b --keep 0.5,0.25,0.1,0.01
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sparselora import Estimator, SparseLoRAConfig, apply_sparselora
from sparselora.engine.peft_compat import base_linear

SHAPES = {
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
}
# Timed (dense, sparse) pairs per case when --repeats is not given: an 8B MLP fwd+bwd takes
# seconds on two cores, a SmolLM2 one milliseconds.
DEFAULT_REPEATS = {"smollm2": 30, "llama3-8b": 3}
ESTIMATOR_RANK = 8
TARGET_MARGIN = 0.05  # the target: sparse/dense <= keep + 0.05, estimator included
COLUMNS = [
    "shape",
    "block",
    "keep",
    "dense_ms",
    "sparse_ms",
    "ratio",
    "target_ratio",
    "estimator_ms",
    "estimator_share",
]


def build_model(shape: str) -> torch.nn.Module:
    """A 1-layer LLaMA of the given layer shape with LoRA r=32 on q/k/v/o, float32."""
    config = LlamaConfig(
        **SHAPES[shape],
        num_hidden_layers=1,
        vocab_size=128,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float()
    lora = LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora).train()


def svd_estimator(layer: torch.nn.Module, rank: int) -> Estimator:
    """Balanced rank-r SVD factors A (in, r), B (r, out) of gate/up/q/k/v of layer 0."""
    projections = dict(
        gate_proj=layer.mlp.gate_proj,
        up_proj=layer.mlp.up_proj,
        q_proj=layer.self_attn.q_proj,
        k_proj=layer.self_attn.k_proj,
        v_proj=layer.self_attn.v_proj,
    )
    factors = {}
    for name, module in projections.items():
        weight_t = base_linear(module).weight.detach().T  # (in, out)
        u, s, v = torch.svd_lowrank(weight_t, q=rank + 8, niter=2)
        root = s[:rank].sqrt()
        factors[(0, name)] = (
            (u[:, :rank] * root).contiguous(),
            (root.unsqueeze(1) * v[:, :rank].T).contiguous(),
        )
    return Estimator(factors, "svd", rank, fingerprint=None)


def fwd_bwd(
    model, handle, call: Callable, x: torch.Tensor, w: torch.Tensor, labels, dense: bool
) -> float:
    """Seconds for one forward + backward of `call(x)` in a micro-batch of x's shape."""
    x.grad = None
    model.zero_grad(set_to_none=True)
    mode = handle.dense() if dense else contextlib.nullcontext()
    start = time.perf_counter()
    with mode, handle.batch(tuple(x.shape[:2]), labels=labels):
        y = call(x)  # (B, T, H)
        (y * w).sum().backward()
    return time.perf_counter() - start


@torch.no_grad()
def selection_time(handle, choose: Callable, x: torch.Tensor, labels) -> float:
    """Seconds for one channel selection of a block, as the sparse forward runs it."""
    with handle.batch(tuple(x.shape[:2]), labels=labels) as batch:
        start = time.perf_counter()
        choose(batch, x)
        return time.perf_counter() - start


def bench_shape(shape: str, keeps: list[float], tokens: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(shape)
    layer = model.get_base_model().model.layers[0]
    hidden = SHAPES[shape]["hidden_size"]
    x = torch.randn(1, tokens, hidden, requires_grad=True)  # (B, T, H)
    w = torch.randn(1, tokens, hidden)  # (B, T, H) loss weights
    labels = torch.full((1, tokens), -100)  # every token is context: all sparse
    position_ids = torch.arange(tokens).unsqueeze(0)  # (B, T)
    rotary = model.get_base_model().model.rotary_emb(x, position_ids)  # (cos, sin)

    def mlp(h):
        return layer.mlp(h)

    def attention(h):
        return layer.self_attn(h, position_embeddings=rotary, attention_mask=None)[0]

    estimator = svd_estimator(layer, ESTIMATOR_RANK)
    rows = []
    for keep in keeps:
        config = SparseLoRAConfig(
            ffn_sparsity={"0": 1.0 - keep},
            attn_sparsity={"0": 1.0 - keep},
            estimator="svd",
            estimator_rank=ESTIMATOR_RANK,
            ffn_criterion="per_token",
            start_step=0.0,
        )
        handle = apply_sparselora(model, config, estimator=estimator, use_cache=False)
        block = handle.blocks[0]
        for name, call, choose in (
            ("mlp", mlp, block._choose_ffn),
            ("attention", attention, block._choose_attention),
        ):
            times = {True: [], False: []}
            for i in range(repeats + 1):  # the first pair warms up
                for dense in (True, False):
                    seconds = fwd_bwd(model, handle, call, x, w, labels, dense)
                    if i > 0:
                        times[dense].append(seconds)
            selection = [
                selection_time(handle, choose, x, labels) for _ in range(max(repeats, 10) + 1)
            ][1:]
            dense_ms = 1e3 * statistics.median(times[True])
            sparse_ms = 1e3 * statistics.median(times[False])
            estimator_ms = 1e3 * statistics.median(selection)
            row = dict(
                shape=shape,
                block=name,
                keep=keep,
                dense_ms=round(dense_ms, 3),
                sparse_ms=round(sparse_ms, 3),
                ratio=round(sparse_ms / dense_ms, 4),
                target_ratio=round(keep + TARGET_MARGIN, 4),
                estimator_ms=round(estimator_ms, 3),
                estimator_share=round(estimator_ms / dense_ms, 4),
            )
            rows.append(row)
            print(
                f"{shape:10s} {name:9s} keep {keep:5.2f}: dense {dense_ms:9.2f} ms  "
                f"sparse {sparse_ms:9.2f} ms  ratio {row['ratio']:.3f}  "
                f"estimator {estimator_ms:.2f} ms ({row['estimator_share']:.2%})",
                flush=True,
            )
        handle.remove()
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| shape | block | keep | dense ms | sparse ms | sparse/dense | target | "
        "estimator ms | estimator / dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['block']} | {r['keep']:.0%} | {r['dense_ms']:.1f} | "
            f"{r['sparse_ms']:.1f} | {r['ratio']:.3f} | {r['target_ratio']:.2f} | "
            f"{r['estimator_ms']:.2f} | {r['estimator_share']:.2%} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama3-8b", help=f"of {sorted(SHAPES)}")
    parser.add_argument("--keep", default="0.5,0.25,0.1,0.01", help="kept channel fractions")
    parser.add_argument("--tokens", type=int, default=512, help="context tokens (batch 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed pairs per case (default {DEFAULT_REPEATS})",
    )
    parser.add_argument("--csv", default="docs/bench_blocks.csv", help="output CSV path")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    args.keep = [float(k) for k in args.keep.split(",")]
    if any(not 0.0 < k < 1.0 for k in args.keep):
        parser.error("--keep: each fraction must be in (0, 1); 1 is the dense baseline itself")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} (1 min)",
        flush=True,
    )
    rows = []
    for shape in args.shapes:
        repeats = args.repeats or DEFAULT_REPEATS[shape]
        rows += bench_shape(shape, args.keep, args.tokens, repeats)
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}; load average {os.getloadavg()[0]:.2f} (1 min)\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
