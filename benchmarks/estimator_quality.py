"""How well do the SVD estimators pick the channels the true activations would pick?

Rebuilds the first measurement (docs/METHOD.md, section 2.4 'The first measurement') with the
library's own estimator and scoring code, on a causal LM (`--model`: an alias of
`sparselora.recipes.loading`, by default the embedded SmolLM2-135M-Instruct; `gemma3-270m` is the
other embedded one) in fp32, eval mode, and GSM8K "question + answer" texts:

1. Calibration: forward `--calib` sequences through the dense model and accumulate, per layer,
   C = mean over tokens of x^T x for the attention input (input of q_proj) and the FFN input
   (input of gate_proj). Whitened factors are fitted to C.
2. Held-out: for `--heldout` other sequences (batch of 1, every token real), capture the same
   inputs plus the o_proj input, and for every layer, estimator kind, rank, criterion and keep
   fraction compare the estimator's kept channels with the ORACLE's (same score on the true
   activations, every token):
   - FFN: a = act(x Wg^T) * (x Wu^T) with the layer's own `mlp.act_fn` (SiLU for LLaMA,
     gelu_pytorch_tanh for Gemma's GeGLU); oracle score_j = ||a[:, j]|| over tokens.
     error = ||a_kept Wd^T - a Wd^T|| / ||a Wd^T|| (non-kept channels zeroed).
   - Q/K: oracle = qk_kv_scores on the true q, k (the projections' outputs, which the estimator
     approximates). error = relative Frobenius error of the causal attention logits q k^T of all
     heads when only the kept channels (KV channels, and the query channels
     `kv_to_query_channels` maps them to) are non-zero. `error` uses the raw projections (no
     q/k norm, no RoPE). `error_rope` is what the attention computes from the masked
     projections, as the sparse block does: the layer's own q_norm / k_norm first where the
     family has them (Gemma 3: an RMSNorm per head, so a head is normalised over its kept
     channels with zeros elsewhere), then the model's RoPE with the cos/sin the model passed to
     that layer (Gemma 3's sliding and full layers use different bases). Causal mask, plus the
     layer's sliding window if shorter than the sequence. The attention scale (1/sqrt(hd), or
     Gemma's query_pre_attn_scalar) is a constant and cancels; attention-logit soft-capping
     (Gemma 2) is not applied.
   - V: oracle = v_kv_scores on the true v. error = ||v_dropped|| / ||v|| per token;
     `error_o_proj` = relative error of the attention block output o_proj(attn_out) with the
     attention-output channels fed by dropped V channels zeroed (exact: they are zero then).
   recall = |est ∩ oracle| / k. Metrics are averaged over held-out sequences, then layers.

Geometry (heads, KV heads, head_dim) is read from each layer's attention module, not from
hidden / heads (Gemma 3: head_dim 256 with hidden 640 and 4 heads).

Rows: `oracle`, `random` (uniform draw), `exact seq_mean` (FFN only: full-rank weights with the
paper's per-sequence mean input, i.e. the criterion's loss without the estimator's), and
`{svd,whitened_svd} r{rank} [{seq_mean,per_token}]`.

    .venv/bin/python benchmarks/estimator_quality.py --csv docs/estimator_quality.csv
    .venv/bin/python benchmarks/estimator_quality.py --model gemma3-270m \
        --csv docs/estimator_quality_gemma3.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.models.llama import modeling_llama

from sparselora.engine.estimator import svd_factors, whitened_svd_factors
from sparselora.engine.selection import (
    ffn_scores,
    kv_to_query_channels,
    num_kept,
    qk_kv_scores,
    random_channels,
    top_k_sorted,
    v_kv_scores,
)
from sparselora.recipes.assets import gsm8k_split
from sparselora.recipes.loading import EMBEDDED_MODEL, load_model, load_tokenizer

KINDS = ("svd", "whitened_svd")
FFN_CRITERIA = ("seq_mean", "per_token")
SITES = {"attn": "self_attn.q_proj", "mlp": "mlp.gate_proj", "attn_out": "self_attn.o_proj"}
# Projections with an estimator, and the site whose input they read.
ESTIMATED = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
}
CSV_FIELDS = [
    "block", "selector", "kind", "rank", "criterion", "keep", "kept", "channels", "layer",
    "recall", "error", "error_rope", "error_o_proj",
]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=EMBEDDED_MODEL, help="model alias, local folder or hub id (fp32)"
    )
    parser.add_argument("--ranks", default="8,32", help="estimator ranks, comma-separated")
    parser.add_argument("--keep", default="0.5,0.25,0.1", help="kept fractions, comma-separated")
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per sequence (cut)")
    parser.add_argument("--damping", type=float, default=1e-2, help="whitened_svd ridge")
    parser.add_argument("--seed", type=int, default=0, help="data split and random selection")
    parser.add_argument("--csv", default="docs/estimator_quality.csv", help="output CSV")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared CPUs)")
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.keep = [float(k) for k in args.keep.split(",")]
    return args


def sequences(tokenizer, rows: list[dict], max_len: int) -> list[torch.Tensor]:
    """Token ids (L,) of each row's "question\\nanswer", cut to max_len."""
    texts = [f"{row['question']}\n{row['answer']}" for row in rows]
    return [tokenizer(text, return_tensors="pt").input_ids[0, :max_len] for text in texts]


class InputCapture:
    """Forward pre-hooks that keep the (L, H) input of each layer's q_proj, gate_proj, o_proj,
    and the (cos, sin) position embeddings the model passed to each layer's attention."""

    def __init__(self, model) -> None:
        self.inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for layer, block in enumerate(model.model.layers):
            for site, path in SITES.items():
                module = block.get_submodule(path)
                self.handles.append(module.register_forward_pre_hook(self._hook(layer, site)))
            self.handles.append(
                block.self_attn.register_forward_pre_hook(self._rope_hook(layer), with_kwargs=True)
            )

    def _hook(self, layer: int, site: str):
        def hook(module, args):
            self.inputs[(layer, site)] = args[0][0].detach()  # batch of 1 -> (L, H)

        return hook

    def _rope_hook(self, layer: int):
        def hook(module, args, kwargs):
            self.rope[layer] = kwargs["position_embeddings"]  # (cos, sin), (1, L, hd) each

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def calibrate(model, capture, calib: list[torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """C = mean over calibration tokens of x^T x, per (layer, 'attn' | 'mlp'), float64."""
    sums: dict[tuple[int, str], torch.Tensor] = defaultdict(lambda: 0.0)
    tokens = 0
    for ids in tqdm(calib, desc="calibration", leave=False):
        model.model(ids[None])  # the decoder only: the hooks need no LM head
        tokens += ids.numel()
        for (layer, site), x in capture.inputs.items():
            if site != "attn_out":
                sums[(layer, site)] = sums[(layer, site)] + x.double().T @ x.double()
    return {key: total / tokens for key, total in sums.items()}


def build_factors(model, covariances, max_rank: int, damping: float) -> dict:
    """factors[(kind, layer, proj)] = (A (in, R), B (R, out)) at R = max_rank.

    Both kinds are thin SVDs with balanced factors, so the rank-r factors are the first r
    columns of A and rows of B: one factorisation serves every rank.
    """
    factors = {}
    for layer, block in enumerate(tqdm(model.model.layers, desc="factors", leave=False)):
        for proj, site in ESTIMATED.items():
            parent = "self_attn" if site == "attn" else "mlp"
            weight = block.get_submodule(f"{parent}.{proj}").weight
            factors[("svd", layer, proj)] = svd_factors(weight, max_rank)
            factors[("whitened_svd", layer, proj)] = whitened_svd_factors(
                weight, covariances[(layer, site)], max_rank, damping
            )
    return factors


def low_rank(factors, kind: str, layer: int, proj: str, rank: int):
    """The estimator's projection x -> x A_r B_r."""
    a, b = factors[(kind, layer, proj)]
    a, b = a[:, :rank], b[:rank]
    return lambda x: (x @ a) @ b


def recall(kept: torch.Tensor, oracle: torch.Tensor) -> float:
    return torch.isin(kept, oracle).sum().item() / kept.numel()


class Results:
    """Per (block, selector, keep, layer): lists of metric values over held-out sequences."""

    def __init__(self) -> None:
        self.values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.kept: dict[tuple[str, float], tuple[int, int]] = {}

    def add(self, block, selector, keep, layer, **metrics) -> None:
        for name, value in metrics.items():
            self.values[(block, selector, keep, layer)][name].append(float(value))

    def rows(self, num_layers: int) -> list[dict]:
        """One row per (block, selector, keep) over all layers ('all'), then one per layer."""
        per_layer = {
            key: {name: sum(vals) / len(vals) for name, vals in metrics.items()}
            for key, metrics in self.values.items()
        }
        groups = defaultdict(dict)
        for (block, selector, keep, layer), metrics in per_layer.items():
            groups[(block, selector, keep)][layer] = metrics
        rows = []
        for (block, selector, keep), layers in groups.items():
            kept, channels = self.kept[(block, keep)]
            parts = selector.split(" ")
            base = {
                "block": block,
                "selector": selector,
                "kind": parts[0],
                "rank": parts[1][1:] if parts[0] in KINDS else "",
                "criterion": parts[-1] if parts[-1] in FFN_CRITERIA else "",
                "keep": keep,
                "kept": kept,
                "channels": channels,
            }
            names = next(iter(layers.values())).keys()
            mean = {m: sum(layers[i][m] for i in range(num_layers)) / num_layers for m in names}
            rows.append({**base, "layer": "all", **mean})
            rows.extend({**base, "layer": i, **layers[i]} for i in range(num_layers))
        return rows


def ffn_metrics(x, layer, mlp, factors, args, generator, results) -> None:
    """x: (T, H) FFN input of one held-out sequence."""
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate, up = (lambda p: p @ w_gate.T), (lambda p: p @ w_up.T)
    act = mlp.act_fn  # SiLU (LLaMA), gelu_pytorch_tanh (Gemma's GeGLU)
    activation = act(gate(x)) * up(x)  # (T, I)
    output = activation @ w_down.T  # (T, H)
    output_norm = output.norm()

    def error(kept):  # a_kept Wd^T - a Wd^T, through the kept columns only
        return ((activation[:, kept] @ w_down[:, kept].T) - output).norm() / output_norm

    mask = torch.ones(1, x.shape[0], dtype=torch.bool)  # (1, T): every token is real
    oracle_scores = ffn_scores(x[None], mask, gate, up, act, per_token=True)
    scores = {"exact seq_mean": ffn_scores(x[None], mask, gate, up, act, per_token=False)}
    for kind in KINDS:
        for rank in args.ranks:
            est_gate = low_rank(factors, kind, layer, "gate_proj", rank)
            est_up = low_rank(factors, kind, layer, "up_proj", rank)
            for criterion in FFN_CRITERIA:
                scores[f"{kind} r{rank} {criterion}"] = ffn_scores(
                    x[None], mask, est_gate, est_up, act, per_token=criterion == "per_token"
                )
    channels = activation.shape[1]
    for keep in args.keep:
        k = num_kept(channels, 1.0 - keep)
        results.kept[("ffn", keep)] = (k, channels)
        oracle = top_k_sorted(oracle_scores, k)
        results.add("ffn", "oracle", keep, layer, recall=1.0, error=error(oracle))
        chosen = random_channels(channels, k, generator)
        results.add(
            "ffn", "random", keep, layer, recall=recall(chosen, oracle), error=error(chosen)
        )
        for selector, score in scores.items():
            chosen = top_k_sorted(score, k)
            results.add(
                "ffn", selector, keep, layer, recall=recall(chosen, oracle), error=error(chosen)
            )


def attention_metrics(x, attn_out, layer, attn, rope, factors, args, generator, results) -> None:
    """x: (T, H) attention input; attn_out: (T, nh*hd) o_proj input, of one held-out sequence;
    rope: the (cos, sin) the model passed to this layer's attention."""
    nh = attn.config.num_attention_heads
    nkv = nh // attn.num_key_value_groups
    hd = attn.head_dim  # not hidden / heads in Gemma
    # The modeling module's own RoPE (the same rotate-half formula in LLaMA and Gemma).
    apply_rotary_pos_emb = getattr(
        sys.modules[type(attn).__module__],
        "apply_rotary_pos_emb",
        modeling_llama.apply_rotary_pos_emb,
    )
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    steps = x.shape[0]
    w_q, w_k, w_v, w_o = (
        attn.q_proj.weight,
        attn.k_proj.weight,
        attn.v_proj.weight,
        attn.o_proj.weight,
    )
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T  # (T, nh*hd), (T, nkv*hd), (T, nkv*hd)
    cos, sin = rope  # (1, T, hd) each
    causal = torch.ones(steps, steps).tril()  # (T, T): the logits softmax actually reads
    window = getattr(attn, "sliding_window", None)
    if window is not None and window < steps:  # query i reads keys i - window < j <= i
        causal = causal.triu(-(window - 1))

    def logits(q, k, rope: bool):  # -> (nh, T, T)
        q_heads = q.view(steps, nh, hd).transpose(0, 1)[None]  # (1, nh, T, hd)
        k_heads = k.view(steps, nkv, hd).transpose(0, 1)[None]  # (1, nkv, T, hd)
        if rope:  # what the attention computes: q/k norms (if any), then RoPE
            if q_norm is not None:
                q_heads, k_heads = q_norm(q_heads), k_norm(k_heads)
            q_heads, k_heads = apply_rotary_pos_emb(q_heads, k_heads, cos, sin)
        k_heads = k_heads.repeat_interleave(nh // nkv, dim=1)  # repeat_kv: head h reads h // G
        return (q_heads @ k_heads.transpose(-1, -2))[0] * causal

    true_logits = {rope: logits(q, k, rope) for rope in (False, True)}

    def qk_errors(kv_kept):
        q_kept = kv_to_query_channels(kv_kept, nh, nkv, hd)
        q_masked, k_masked = torch.zeros_like(q), torch.zeros_like(k)
        q_masked[:, q_kept], k_masked[:, kv_kept] = q[:, q_kept], k[:, kv_kept]
        errors = {}
        for rope, name in ((False, "error"), (True, "error_rope")):
            true = true_logits[rope]
            errors[name] = (logits(q_masked, k_masked, rope) - true).norm() / true.norm()
        return errors

    o_true = attn_out @ w_o.T  # (T, H)

    def v_errors(kv_kept):
        dropped = torch.ones(v.shape[1], dtype=torch.bool)
        dropped[kv_kept] = False
        o_kept = kv_to_query_channels(kv_kept, nh, nkv, hd)
        o_sparse = attn_out[:, o_kept] @ w_o[:, o_kept].T
        return {
            "error": v[:, dropped].norm() / v.norm(),
            "error_o_proj": (o_sparse - o_true).norm() / o_true.norm(),
        }

    qk_scores = {"oracle": qk_kv_scores(q, k, nh, nkv)}
    v_scores = {"oracle": v_kv_scores(v)}
    for kind in KINDS:
        for rank in args.ranks:
            q_hat = low_rank(factors, kind, layer, "q_proj", rank)(x)  # (T, nh*hd)
            k_hat = low_rank(factors, kind, layer, "k_proj", rank)(x)  # (T, nkv*hd)
            v_hat = low_rank(factors, kind, layer, "v_proj", rank)(x)  # (T, nkv*hd)
            qk_scores[f"{kind} r{rank}"] = qk_kv_scores(q_hat, k_hat, nh, nkv)
            v_scores[f"{kind} r{rank}"] = v_kv_scores(v_hat)

    channels = nkv * hd
    for block, scores, errors in (("qk", qk_scores, qk_errors), ("v", v_scores, v_errors)):
        for keep in args.keep:
            kept = num_kept(channels, 1.0 - keep)
            results.kept[(block, keep)] = (kept, channels)
            oracle = top_k_sorted(scores["oracle"], kept)
            chosen_by = {"random": random_channels(channels, kept, generator)}
            chosen_by.update({s: top_k_sorted(score, kept) for s, score in scores.items()})
            for selector, chosen in chosen_by.items():
                results.add(
                    block, selector, keep, layer, recall=recall(chosen, oracle), **errors(chosen)
                )


def markdown_tables(rows: list[dict], keeps: list[float]) -> str:
    """One table per block: a row per selector, a column per keep fraction."""
    titles = {
        "ffn": ("FFN (gate/up/down)", "recall / output error"),
        "qk": ("Q/K", "recall / logit error (no RoPE) / logit error (q/k norm + RoPE)"),
        "v": ("V/O", "recall / v error / o_proj output error"),
    }
    metrics = {
        "ffn": ["recall", "error"],
        "qk": ["recall", "error", "error_rope"],
        "v": ["recall", "error", "error_o_proj"],
    }
    summary = [row for row in rows if row["layer"] == "all"]
    out = []
    for block, (title, cell) in titles.items():
        block_rows = [row for row in summary if row["block"] == block]
        kept = {row["keep"]: f"{row['kept']}/{row['channels']}" for row in block_rows}
        out.append(f"### {title}: {cell}\n")
        out.append("| selector | " + " | ".join(f"keep {k:.0%} ({kept[k]})" for k in keeps) + " |")
        out.append("|---|" + "---|" * len(keeps))
        selectors = list(dict.fromkeys(row["selector"] for row in block_rows))
        for selector in selectors:
            cells = []
            for keep in keeps:
                row = next(r for r in block_rows if r["selector"] == selector and r["keep"] == keep)
                cells.append(" / ".join(f"{row[m]:.2f}" for m in metrics[block]))
            out.append(f"| {selector} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model, "float32")
    tokenizer = load_tokenizer(args.model)
    model.eval()
    train_rows, _ = gsm8k_split(seed=args.seed)
    texts = sequences(tokenizer, train_rows[: args.calib + args.heldout], args.max_len)
    calib, heldout = texts[: args.calib], texts[args.calib :]

    capture = InputCapture(model)
    covariances = calibrate(model, capture, calib)
    factors = build_factors(model, covariances, max(args.ranks), args.damping)

    results = Results()
    generator = torch.Generator().manual_seed(args.seed)
    layers = model.model.layers
    for ids in tqdm(heldout, desc="held-out sequences"):
        model.model(ids[None])  # the decoder only: the hooks need no LM head
        for layer, block in enumerate(layers):
            inputs = {site: capture.inputs[(layer, site)] for site in SITES}
            ffn_metrics(inputs["mlp"], layer, block.mlp, factors, args, generator, results)
            attention_metrics(
                inputs["attn"],
                inputs["attn_out"],
                layer,
                block.self_attn,
                capture.rope[layer],
                factors,
                args,
                generator,
                results,
            )
    capture.remove()

    rows = results.rows(len(layers))
    calib_tokens = sum(ids.numel() for ids in calib)
    heldout_tokens = sum(ids.numel() for ids in heldout)
    print(
        f"{args.model} ({model.config.model_type}) fp32, {datetime.date.today()}: "
        f"{len(layers)} layers, "
        f"{len(calib)} calibration sequences ({calib_tokens} tokens), {len(heldout)} held-out "
        f"({heldout_tokens} tokens), max_len {args.max_len}, damping {args.damping}, "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(markdown_tables(rows, args.keep))
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
