"""SparseLoRA under FSDP2 (`fully_shard`): 2 CPU processes (gloo) through torch.distributed.run,
compared with the same steps in one process.

Each step's global batch is 4 rows; rank r trains on rows RANK_ROWS[r] (9 labelled tokens on
each rank) and FSDP2 averages the two ranks' gradients. The single-process reference runs the
two halves as two micro-batches of one step, each loss halved, so its gradient is the same
average, computed without sharding: the same math, so only float rounding may differ.
Tolerances (float32, 4 SGD steps): losses 1e-5, adapter weights 1e-6 (absolute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ATTN, MLP, lora_model, tiny_llama
from fsdp_worker import RANK_ROWS, STEPS, build_model, kept_indices, optimizer, rank_batch

LOSS_ATOL = 1e-5
ADAPTER_ATOL = 1e-6
RANKS = range(len(RANK_ROWS))


@pytest.fixture(scope="module")
def reference() -> dict:
    """The workers' steps in one process: per rank its losses, the channels kept in its last
    micro-batch and the FLOPs its micro-batches saved; the trained adapters; the fingerprint."""
    model, handle = build_model()
    opt = optimizer(model)
    model.train()
    losses = {r: [] for r in RANKS}
    flops_saved = dict.fromkeys(RANKS, 0.0)
    selection = {}
    for step in range(STEPS):
        for r in RANKS:
            before = handle.stats.flops_saved
            loss = model(**rank_batch(step, r)).loss
            (loss / len(RANKS)).backward()
            losses[r].append(loss.item())
            flops_saved[r] += handle.stats.flops_saved - before
            selection[r] = kept_indices(handle)
        opt.step()
        opt.zero_grad()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "losses": losses,
        "flops_saved": flops_saved,
        "selection": selection,
        "adapters": adapters,
        "fingerprint": handle.fingerprint,
    }


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """Run the 2 workers; their reports and adapters. Judged on the files the workers write
    before teardown, not on the exit code: process-group teardown under gloo sometimes aborts
    (SIGABRT) after the work is done, with or without SparseLoRA."""
    out = tmp_path_factory.mktemp("fsdp")
    worker = Path(__file__).parent / "fsdp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(len(RANK_ROWS)), str(worker), str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    missing = [f.name for r in RANKS for f in (out / f"rank{r}.json", out / f"rank{r}.pt")]
    missing = [name for name in missing if not (out / name).exists()]
    assert not missing, f"no {missing} (exit {result.returncode}):\n{result.stderr[-3000:]}"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in RANKS]
    adapters = [torch.load(out / f"rank{r}.pt") for r in RANKS]
    return reports, adapters


def test_fsdp2_steps_match_single_process(fsdp_run, reference):
    reports, adapters = fsdp_run
    for r in RANKS:
        assert reports[r]["losses"] == pytest.approx(reference["losses"][r], abs=LOSS_ATOL, rel=0)
        assert adapters[r].keys() == reference["adapters"].keys()
        assert len(adapters[r]) == 3 * 7 * 2  # lora_A and lora_B of 7 projections in 3 layers
        for name, weight in reference["adapters"].items():
            torch.testing.assert_close(
                adapters[r][name], weight, atol=ADAPTER_ATOL, rtol=0, msg=name
            )
    # The adapters moved far beyond the tolerance: not a comparison of two untrained models.
    untrained = dict(lora_model(tiny_llama(), ATTN + MLP).named_parameters())
    moved = max((w - untrained[n]).abs().max().item() for n, w in reference["adapters"].items())
    assert moved > 1000 * ADAPTER_ATOL


def test_fsdp2_sparsity_engages_on_each_rank(fsdp_run, reference):
    reports, _ = fsdp_run
    for r in RANKS:
        report = reports[r]
        # Each rank kept the channels the single process keeps for that rank's micro-batch.
        assert report["selection"] == reference["selection"][r]
        assert sorted(report["selection"]) == ["0", "1", "2"]
        assert {len(keep) for keep in report["selection"]["0"].values()} == {48}  # of 96
        assert len(report["selection"]["2"]["k_proj"]) == 16  # of 32 key channels
        stats = report["stats"]
        assert stats["ffn_kept"] == 0.5 and stats["attn_kept"] == 0.5
        assert stats["flops_saved"] > 0
        assert stats["flops_saved"] == pytest.approx(reference["flops_saved"][r], rel=1e-12)
        assert stats["dense_steps"] == 0
    # Contextual sparsity is per micro-batch: the ranks, on different rows, chose differently.
    assert reports[0]["selection"] != reports[1]["selection"]


def test_fsdp2_estimator_fingerprint_is_identical_on_each_rank(fsdp_run, reference):
    reports, _ = fsdp_run
    for report in reports:
        assert report["fingerprint"] == reference["fingerprint"]
        assert report["estimator_fingerprint"] == reference["fingerprint"]


def test_fsdp2_apply_order(fsdp_run):
    """apply_sparselora before fully_shard: the estimator is built from full weights, and the
    wrapped MLP reads the full weight FSDP gathered for its layer (a shard outside the forward).
    After fully_shard, apply_sparselora refuses the sharded (DTensor) weights."""
    reports, _ = fsdp_run
    for report in reports:
        seen = report["weights_seen_by_wrapped_mlp"]
        assert seen["outside_forward"] == ["DTensor", [48, 64]]  # gate_proj (96, 64), dim 0
        assert seen["inside_forward"][0] != "DTensor"
        assert seen["inside_forward"][1] == [96, 64]
        assert report["apply_after_shard"].startswith("ValueError: layer 0: the frozen weights")
        assert "before fully_shard" in report["apply_after_shard"]
