"""`sparselora estimator build`: the whitened estimator lands in the cache under the name that a
run calibrated on the same data looks up, and an unwritable cache is one clear error."""

from __future__ import annotations

import json

import pytest

from sparselora.engine.estimator import Estimator
from sparselora.recipes.commands import build_estimator_file
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    save_tiny_llama(root / "tiny", layers=2, hidden=32)
    rows = [{"prompt": f"{a} plus 1 is", "completion": f" {a + 1}"} for a in range(6)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "sparse.yaml").write_text(
        "ffn_sparsity: {'1': 0.5}\nestimator: whitened_svd\nestimator_rank: 4\n"
    )
    return root


def test_whitened_estimator_is_built_into_the_cache_under_its_calibration(setup, monkeypatch):
    monkeypatch.setenv("SPARSELORA_CACHE", str(setup / "cache"))
    path = build_estimator_file(
        str(setup / "tiny"), str(setup / "sparse.yaml"), None, None, None, None,
        data=str(setup / "data.jsonl"),
    )  # fmt: skip
    assert path.is_file() and path.parent == setup / "cache" / "estimators"
    estimator = Estimator.load(path)
    assert estimator.kind == "whitened_svd" and estimator.calibration
    assert f"-c{estimator.calibration[:16]}" in path.name


def test_an_unwritable_cache_is_one_error_pointing_to_output(setup, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SPARSELORA_CACHE", str(blocker))
    with pytest.raises(OSError, match="--output"):
        build_estimator_file(
            str(setup / "tiny"), str(setup / "sparse.yaml"), None, None, None, None,
            data=str(setup / "data.jsonl"),
        )  # fmt: skip
    out = tmp_path / "est.safetensors"
    got = build_estimator_file(
        str(setup / "tiny"), str(setup / "sparse.yaml"), None, None, None, str(out),
        data=str(setup / "data.jsonl"),
    )  # fmt: skip
    assert got == out and Estimator.load(out).kind == "whitened_svd"
