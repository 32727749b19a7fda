"""The prepared GPU script (benchmarks/gpu_bench.sh) runs end to end as a CPU dry run on a
tiny 32-layer model, so the one GPU call it is meant for cannot fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / ".venv/bin/sparselora").exists(), reason="needs make setup")
def test_gpu_script_dry_run_on_cpu(tmp_path):
    model_dir = tmp_path / "tiny-32-layers"  # the llama3-8b presets name layers up to 31
    LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ).save_pretrained(model_dir)
    out = tmp_path / "gpu"
    env = dict(
        os.environ,
        OUT=str(out),
        DEVICE="cpu",
        DTYPE="float32",
        MODEL=str(model_dir),
        STEPS="1",
        WARMUP="0",
        SHAPES_MATH="32,8",
        SHAPES_CSR="32,3",
        SMOLLM2="0",
        SKIP_TESTS="1",
    )
    subprocess.run(
        ["bash", "benchmarks/gpu_bench.sh"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    assert (out / "env.txt").read_text().strip()
    for name, shape in (("llama3-8b-math10k", (32, 8)), ("llama3-8b-csr", (32, 3))):
        results = json.loads((out / name / "bench.json").read_text())
        rows = results["rows"]
        assert [row["padding"] for row in rows] == ["none", "left"]
        assert all((row["seq_len"], row["out_tokens"]) == shape for row in rows)
        assert all(row["speedup"] > 0 and row["predicted_speedup"] > 1 for row in rows)
