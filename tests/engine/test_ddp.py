"""SparseLoRA under DDP: 2 CPU processes (gloo) through torch.distributed.run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_ddp_trains_and_keeps_ranks_identical(tmp_path):
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", str(worker), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for name, weight in ranks[0].items():
        assert torch.equal(weight, ranks[1][name]), name
    for r in (0, 1):
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        losses = report["losses"]
        assert len(losses) == 8 and losses[-1] < losses[0]
        assert report["sparse_layers"] == [0, 1, 2]  # the last steps ran sparse
