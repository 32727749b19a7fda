"""benchmarks/bench_skinny_gemms.py: every product it times is checked against x W^T / g W
first, and the table has a row per row count with each variant's time and read rate."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import load_benchmark

bench = load_benchmark("bench_skinny_gemms")


def test_every_product_is_timed_per_row_count(monkeypatch, capsys):
    argv = ["bench_skinny_gemms.py", "--shapes", "600x32", "--rows", "3", "20"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "2", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "W 600x32" in out
    header = next(line for line in out.splitlines() if line.startswith("| rows |"))
    for name in ("fwd x W^T", "fwd (W x^T)^T", "bwd g W", "bwd (W^T g^T)^T", "bwd blocked"):
        assert name in header
    rows = [line for line in out.splitlines() if line.startswith(("| 3 |", "| 20 |"))]
    assert len(rows) == 2 and all(line.count("(") == 6 for line in rows)


def test_the_check_catches_a_product_that_differs():
    weight, x, g = torch.randn(40, 8), torch.randn(3, 8), torch.randn(3, 40)
    fns = bench.variants(x, g, weight)
    bench.check(fns, x, g, weight)  # the real ones pass
    fns["bwd blocked"] = lambda: g[:, 1:] @ weight[1:]  # a row of W left out
    with pytest.raises(AssertionError, match="bwd blocked"):
        bench.check(fns, x, g, weight)
