"""One rank of the 2-process FSDP2 test (run by tests/engine/test_fsdp.py through torch.distributed.run).

Also the shared recipe of that test: the model, the batches and the optimizer that the
single-process reference in test_fsdp.py runs as well.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ATTN, MLP, lora_model, make_batch, sparse_config, tiny_llama  # noqa: E402

from sparselora import apply_sparselora  # noqa: E402
from sparselora.engine.peft_compat import base_linear  # noqa: E402

STEPS = 4
LEARNING_RATE = 0.2
# Rows of each step's 4-row global batch per rank: make_batch labels 3, 4, 5 and 6 tokens in rows
# 0-3, so each rank holds 9 labelled tokens and the mean of the ranks' token-mean losses is the
# token-mean loss of the global batch.
RANK_ROWS = ([0, 3], [1, 2])


def build_model():
    """The tiny LLaMA with LoRA on every projection and SparseLoRA applied (svd estimator, FFN
    sparsity on layers 0-2, attention on 1-2, exact savings on); same seeds on every rank."""
    model = lora_model(tiny_llama(), ATTN + MLP)
    handle = apply_sparselora(model, sparse_config(channels_only=False), use_cache=False)
    return model, handle


def rank_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s half of step `step`'s global batch (2 rows, right-padded)."""
    batch = make_batch(batch=4, length=12, padding="right", seed=10 + step)
    return {name: value[RANK_ROWS[rank]] for name, value in batch.items()}


def optimizer(model) -> torch.optim.Optimizer:
    """Plain SGD: an update proportional to the gradient, so the adapters compare the summed
    gradients. AdamW's g / (sqrt(v) + eps) would turn float-rounding differences of gradients
    below eps into update differences up to the learning rate."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)


def kept_indices(handle) -> dict[str, dict[str, list[int]]]:
    """{layer: {projection: kept indices}} of the handle's last sparse forward, JSON-ready."""
    return {
        str(layer): {name: keep.tolist() for name, keep in chosen.items()}
        for layer, chosen in handle.last_selection().items()
    }


def shard(model) -> None:
    """FSDP2: each decoder layer its own unit, then the root (embeddings, norm, LM head)."""
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model, handle = build_model()  # apply first: the estimator is built from the full weights
    shard(model)
    gate = base_linear(model.get_base_model().model.layers[1].mlp.gate_proj)
    seen = {"outside_forward": [type(gate.weight).__name__, list(gate.weight.to_local().shape)]}

    def look(module, args):  # the wrapped MLP runs here, after FSDP's all-gather of layer 1
        seen["inside_forward"] = [type(gate.weight).__name__, list(gate.weight.shape)]

    hook = model.get_base_model().model.layers[1].mlp.register_forward_pre_hook(look)
    opt = optimizer(model)
    model.train()
    losses = []
    for step in range(STEPS):
        loss = model(**rank_batch(step, rank)).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients averaged over the 2 ranks
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    hook.remove()
    adapters = {
        name: p.full_tensor().detach().clone()  # collective: every rank, same order
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    report = {
        "losses": losses,
        "selection": kept_indices(handle),
        "stats": handle.stats.window(),
        "fingerprint": handle.fingerprint,
        "estimator_fingerprint": handle.estimator.fingerprint,
        "weights_seen_by_wrapped_mlp": seen,
        "apply_after_shard": apply_after_shard(),
    }
    torch.save(adapters, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def apply_after_shard() -> str | None:
    """The error apply_sparselora raises on a model already sharded by fully_shard (its weights
    are DTensor shards), or None if it accepts it."""
    model = lora_model(tiny_llama(), ATTN + MLP)
    shard(model)
    try:
        apply_sparselora(model, sparse_config(channels_only=False), use_cache=False)
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return f"{type(error).__name__}: {error}"
    return None


if __name__ == "__main__":
    main(Path(sys.argv[1]))
