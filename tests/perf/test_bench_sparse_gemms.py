"""benchmarks/bench_sparse_gemms.py: every GEMM layout it times computes the same output and
input gradient (checked before timing), and the engine's transposed GEMMs really run in it."""

from __future__ import annotations

import sys

import pytest
from conftest import load_benchmark

from sparselora.engine import ops

bench = load_benchmark("bench_sparse_gemms")


def test_every_layout_is_checked_and_timed(monkeypatch, capsys):
    calls = []
    apply = ops.TransposedLinear.apply
    monkeypatch.setattr(
        ops.TransposedLinear, "apply", lambda x, w: calls.append(w.shape) or apply(x, w)
    )
    argv = ["bench_sparse_gemms.py", "--model", "tiny", "--repeats", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    for name in (
        "split+stack",
        "split+stack+Tf",
        "split+stack+T",
        "all+rest",
        "split+T",
        "split+T+add",
    ):
        assert f"| {name} |" in out
    assert calls  # the 20 dense rows go through ops.TransposedLinear


def test_the_check_catches_a_layout_that_differs():
    x = bench.torch.randn(8, 4)
    wrong_output = {"split": lambda t: t * 2, "wrong": lambda t: t * 2 + 1e-3}
    with pytest.raises(AssertionError, match="wrong: output"):
        bench.check_variants(wrong_output, x)
    wrong_gradient = {"split": lambda t: t * 2, "wrong": lambda t: t * 2 + (t - t.detach())}
    with pytest.raises(AssertionError, match="wrong: input gradient"):
        bench.check_variants(wrong_gradient, x)
