"""Estimator factors, files and the fingerprinted cache."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, lora_model, make_batch, tiny_llama
from safetensors.torch import save_file

from sparselora import (
    Estimator,
    EstimatorCache,
    EstimatorMismatchError,
    SparseLoRAConfig,
    apply_sparselora,
)
from sparselora.engine.estimator import svd_factors, weights_fingerprint


def test_svd_factors_are_the_best_rank_r_approximation():
    weight = torch.randn(40, 24)
    a, b = svd_factors(weight, 5)
    assert a.shape == (24, 5) and b.shape == (5, 40) and a.dtype == torch.float32
    s = torch.linalg.svdvals(weight)
    error = torch.linalg.matrix_norm(a @ b - weight.T)
    torch.testing.assert_close(error, s[5:].norm(), rtol=1e-4, atol=1e-5)
    a_full, b_full = svd_factors(weight, 24)
    torch.testing.assert_close(a_full @ b_full, weight.T, rtol=1e-4, atol=1e-4)


def test_factors_are_float32_for_bf16_weights():
    a, b = svd_factors(torch.randn(16, 8).to(torch.bfloat16), 4)
    assert a.dtype == b.dtype == torch.float32


def test_save_and_load_round_trip_with_author_key_layout(tmp_path):
    weights = {(0, "gate_proj"): torch.randn(12, 8), (3, "q_proj"): torch.randn(8, 8)}
    estimator = Estimator.build(weights, "svd", 4, model_name="tiny")
    path = tmp_path / "est.safetensors"
    estimator.save(path)
    loaded = Estimator.load(path, fingerprint=estimator.fingerprint)
    assert loaded.kind == "svd" and loaded.rank == 4 and loaded.model_name == "tiny"
    for key, (a, b) in estimator.factors.items():
        assert torch.equal(loaded.factors[key][0], a) and torch.equal(loaded.factors[key][1], b)
    # a file in the authors' layout, without our metadata, also loads
    save_file(
        {"0.gate_proj.w1": torch.randn(8, 4), "0.gate_proj.w2": torch.randn(4, 12)},
        tmp_path / "a.st",
    )
    assert Estimator.load(tmp_path / "a.st").factors[(0, "gate_proj")][0].shape == (8, 4)


def test_file_for_other_weights_is_refused(tmp_path):
    weights = {(0, "gate_proj"): torch.randn(12, 8)}
    estimator = Estimator.build(weights, "svd", 4)
    estimator.save(tmp_path / "est.safetensors")
    other = weights_fingerprint({(0, "gate_proj"): torch.randn(12, 8)})
    with pytest.raises(EstimatorMismatchError, match="other weights"):
        Estimator.load(tmp_path / "est.safetensors", fingerprint=other)


def test_apply_refuses_an_estimator_built_for_another_model(tmp_path):
    config = SparseLoRAConfig(ffn_sparsity=0.5, estimator="svd", start_step=0.0)
    first = apply_sparselora(lora_model(tiny_llama(seed=0), ATTN), config, use_cache=False)
    path = tmp_path / "est.safetensors"
    first.estimator.save(path)
    other_model = lora_model(tiny_llama(seed=5), ATTN)
    with pytest.raises(EstimatorMismatchError, match="other weights"):
        apply_sparselora(other_model, config, estimator=path, use_cache=False)


def test_cache_reuses_and_rebuilds_stale_factors(tmp_cache):
    config = SparseLoRAConfig(ffn_sparsity=0.5, estimator="svd", start_step=0.0)
    model = lora_model(tiny_llama(), ATTN)
    handle = apply_sparselora(model, config, cache_dir=tmp_cache)
    files = list(tmp_cache.iterdir())
    assert len(files) == 1
    handle.remove()
    again = apply_sparselora(model, config, cache_dir=tmp_cache)
    assert again.estimator.fingerprint == handle.estimator.fingerprint
    again.remove()
    # the weights change (a merge, a new checkpoint): the cached file no longer applies
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    fresh = apply_sparselora(model, config, cache_dir=tmp_cache)
    assert fresh.estimator.fingerprint != handle.estimator.fingerprint
    assert len(list(tmp_cache.iterdir())) == 2
    # a corrupt cache file is rebuilt, not trusted
    cache = EstimatorCache(tmp_cache)
    path = cache.path(fresh.estimator.fingerprint, "svd", 8)
    path.write_bytes(b"not a safetensors file")
    fresh.remove()
    rebuilt = apply_sparselora(model, config, cache_dir=tmp_cache)
    assert rebuilt.estimator.fingerprint == fresh.estimator.fingerprint
    assert Estimator.load(path).fingerprint == fresh.estimator.fingerprint


def test_whitened_estimator_calibrates_on_the_first_training_batches(tmp_cache):
    config = SparseLoRAConfig(
        ffn_sparsity=0.5, attn_sparsity={"1": 0.5}, start_step=0.0, calibration_tokens=60
    )
    model = lora_model(tiny_llama(), ATTN)
    handle = apply_sparselora(model, config, cache_dir=tmp_cache)
    assert not handle.ready
    batch = make_batch()  # 3 x 12 = 36 real tokens
    model(**batch)
    assert not handle.ready and handle.last_selection() == {}  # still dense, calibrating
    model(**batch)
    model(**batch)  # 72 tokens seen: fitted before this forward, which runs sparse
    assert handle.ready and handle.estimator.kind == "whitened_svd"
    # Layer 2 is the last: its context tokens skip the FFN entirely, so it chooses no channels.
    assert sorted(handle.last_selection()) == [0, 1]
    assert len(list(tmp_cache.iterdir())) == 1


@pytest.mark.parametrize("shape", [(60, 24), (24, 60)])
def test_top_singular_matches_full_svd(shape):
    from sparselora.engine.estimator import top_singular

    matrix = torch.randn(*shape, dtype=torch.float64)
    u, s, vh = top_singular(matrix, 5)
    full_u, full_s, full_vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(s, full_s[:5])
    torch.testing.assert_close(
        u @ torch.diag(s) @ vh, full_u[:, :5] @ torch.diag(full_s[:5]) @ full_vh[:5]
    )


def test_estimator_for_every_layer_serves_a_subset_and_the_cache_merges(tmp_cache):
    model = lora_model(tiny_llama(), ATTN)
    every = apply_sparselora(
        model,
        SparseLoRAConfig(ffn_sparsity=0.5, attn_sparsity=0.5, estimator="svd"),
        use_cache=False,
    )
    full = every.estimator
    every.remove()
    subset = SparseLoRAConfig(ffn_sparsity={"1": 0.5}, estimator="svd")
    handle = apply_sparselora(model, subset, estimator=full, use_cache=False)
    assert handle.estimator is full
    handle.remove()
    # the cache grows to hold the union of what successive configs needed
    apply_sparselora(model, subset, cache_dir=tmp_cache).remove()
    apply_sparselora(
        model, SparseLoRAConfig(attn_sparsity={"2": 0.5}, estimator="svd"), cache_dir=tmp_cache
    )
    (path,) = tmp_cache.iterdir()
    assert set(Estimator.load(path).factors) == {
        (1, "gate_proj"),
        (1, "up_proj"),
        (2, "q_proj"),
        (2, "k_proj"),
        (2, "v_proj"),
    }
