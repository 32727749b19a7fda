"""Losing nothing: damaged estimator files and caches, one handle per model, merges while
applied, dense forwards that are announced and counted, calibration-keyed caches, and FLOPs
statistics that gradient checkpointing does not inflate."""

from __future__ import annotations

import copy
import json
import logging
import re
import struct

import pytest
import torch
from conftest import ATTN, CHANNELS_ONLY, MLP, left_padded_batch, lora_model, make_batch, tiny_llama
from safetensors.torch import save_file

from sparselora import Estimator, SparseLoRAConfig, apply_sparselora
from sparselora.engine.estimator import EstimatorFileError
from sparselora.engine.flops import step_flops
from sparselora.engine.shapes import ModelShape

SVD = SparseLoRAConfig(
    ffn_sparsity=0.5, attn_sparsity={"1-2": 0.5}, estimator="svd", start_step=0.0, **CHANNELS_ONLY
)
WHITENED = SparseLoRAConfig(
    ffn_sparsity=0.5, attn_sparsity={"1": 0.5}, start_step=0.0, calibration_tokens=60
)


def calibration(seed: int, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """`count` padded batches of random tokens, without labels."""
    batches = [make_batch(padding="right", seed=seed + i) for i in range(count)]
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


def warnings_of(caplog, pattern: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and re.search(pattern, r.getMessage())
    ]


# -- 7a: a damaged estimator file is one clear error naming it -------------------------------


def saved_estimator(tmp_path):
    weights = {(0, "gate_proj"): torch.randn(12, 8), (1, "q_proj"): torch.randn(8, 8)}
    path = tmp_path / "est.safetensors"
    Estimator.build(weights, "svd", 4, model_name="tiny").save(path)
    return path


def with_metadata(path, **changes):
    """Rewrite our estimator file at `path` with some metadata fields changed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), **changes}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(tensors, path, metadata=metadata)


DAMAGES = {
    "garbage": lambda p: p.write_bytes(b"\x07garbage\x00" * 20),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "missing_w2": lambda p: save_file({"0.gate_proj.w1": torch.randn(8, 4)}, p),
    "wrong_names": lambda p: save_file({"model.layers.0.mlp.gate_proj.weight": torch.ones(4)}, p),
    "bad_part": lambda p: save_file(
        {"0.gate_proj.w1": torch.randn(8, 4), "0.gate_proj.w3": torch.randn(4, 12)}, p
    ),
    "mismatched_rank": lambda p: save_file(
        {"0.gate_proj.w1": torch.randn(8, 4), "0.gate_proj.w2": torch.randn(3, 12)}, p
    ),
    "bad_rank_metadata": lambda p: with_metadata(p, rank="eight"),
    "unknown_kind": lambda p: with_metadata(p, kind="pca"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_estimator_file_is_one_clear_error_naming_it(tmp_path, damage):
    path = saved_estimator(tmp_path)
    DAMAGES[damage](path)
    with pytest.raises(EstimatorFileError, match=re.escape(str(path))) as err:
        Estimator.load(path)
    assert "\n" not in str(err.value)


def test_apply_with_a_damaged_estimator_file_names_the_file(tmp_path):
    path = tmp_path / "est.safetensors"
    path.write_bytes(b"not a safetensors file")
    model = lora_model(tiny_llama(), ATTN)
    with pytest.raises(EstimatorFileError, match=re.escape(str(path))):
        apply_sparselora(model, SVD, estimator=path, use_cache=False)


# -- 7b: non-finite factors and bit flips are caught ----------------------------------------


def test_non_finite_factors_are_refused_on_load_and_on_build(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file(
        {"0.gate_proj.w1": torch.full((8, 4), float("nan")), "0.gate_proj.w2": torch.ones(4, 12)},
        path,
    )
    with pytest.raises(EstimatorFileError, match="not finite"):
        Estimator.load(path)
    weight = torch.randn(12, 8)
    weight[3, 2] = float("inf")
    with pytest.raises(ValueError, match="layer 0 gate_proj is not finite"):
        Estimator.build({(0, "gate_proj"): weight}, "svd", 4)


def test_a_bit_flip_that_keeps_values_finite_fails_the_checksum(tmp_path):
    path = saved_estimator(tmp_path)
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    data[8 + header_size] ^= 0x01  # lowest mantissa bit of the first stored value
    path.write_bytes(bytes(data))
    with pytest.raises(EstimatorFileError, match="checksum"):
        Estimator.load(path)


def test_files_without_a_checksum_still_load(tmp_path):
    path = saved_estimator(tmp_path)
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert header["__metadata__"]["checksum"]
    metadata = {k: v for k, v in header["__metadata__"].items() if k != "checksum"}
    loaded = Estimator.load(path)
    save_file({f"{layer}.{proj}.{part}": t for (layer, proj), pair in loaded.factors.items()
               for part, t in zip(("w1", "w2"), pair, strict=True)}, path, metadata=metadata)  # fmt: skip
    assert Estimator.load(path).factors.keys() == loaded.factors.keys()


# -- 7c: a cache that cannot be written, or holds a damaged file ------------------------------


def test_an_unwritable_cache_warns_and_training_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    cache_dir = blocker / "estimators"  # cannot be created, even by root
    model = lora_model(tiny_llama(), ATTN)
    batch = make_batch()
    with caplog.at_level(logging.WARNING):
        svd = apply_sparselora(model, SVD, cache_dir=cache_dir)
        assert svd.ready
        model(**batch)
        svd.remove()
        handle = apply_sparselora(model, WHITENED, cache_dir=cache_dir)
        for _ in range(3):  # the third forward fits the estimator, then runs sparse
            model(**batch).loss.backward()
    assert handle.ready and handle.last_selection()
    assert len(warnings_of(caplog, re.escape(str(cache_dir)))) >= 2


def test_a_damaged_cached_file_is_rebuilt_with_a_warning(tmp_cache, caplog):
    model = lora_model(tiny_llama(), ATTN)
    first = apply_sparselora(model, SVD, cache_dir=tmp_cache)
    first.remove()
    (path,) = tmp_cache.iterdir()
    nan = {
        k: (torch.full_like(a, float("nan")), b) for k, (a, b) in first.estimator.factors.items()
    }
    Estimator(nan, "svd", 8, first.estimator.fingerprint).save(path)
    with caplog.at_level(logging.WARNING):
        again = apply_sparselora(model, SVD, cache_dir=tmp_cache)
    assert warnings_of(caplog, re.escape(str(path)))
    assert all(a.isfinite().all() for a, _ in again.estimator.factors.values())
    assert all(a.isfinite().all() for a, _ in Estimator.load(path).factors.values())


# -- 8: one handle per model; merges while applied --------------------------------------------


def test_a_second_apply_is_refused_until_the_first_handle_is_removed():
    model = lora_model(tiny_llama(), ATTN)
    first = apply_sparselora(model, SVD, use_cache=False)
    for target in (model, model.get_base_model()):
        with pytest.raises(ValueError, match=r"already.*\.remove\(\)"):
            apply_sparselora(target, SVD, use_cache=False)
    first.remove()
    second = apply_sparselora(model, SVD, use_cache=False)
    model.train()
    model(**make_batch())
    assert second.last_selection()


@pytest.mark.parametrize(
    "targets, config",
    [(ATTN + MLP, SVD), (ATTN, SparseLoRAConfig(ffn_sparsity=0.5, estimator="svd"))],
    ids=["adapters-in-sparse-blocks", "adapters-elsewhere"],
)
def test_merge_and_unload_while_applied_is_a_clear_error(targets, config):
    model = lora_model(tiny_llama(), targets)
    reference = copy.deepcopy(model).merge_and_unload()
    batch = make_batch()
    handle = apply_sparselora(model, config, use_cache=False)
    merged = model.merge_and_unload()
    merged.train()
    with pytest.raises(RuntimeError, match=r"merge.*handle\.remove\(\) first"):
        merged(**batch)
    handle.remove()
    assert torch.equal(merged(**batch).logits, reference.train()(**batch).logits)


def test_merge_adapter_in_place_runs_dense_with_one_warning(caplog):
    model = lora_model(tiny_llama(), ATTN + MLP)
    batch = make_batch()
    handle = apply_sparselora(model, SVD, use_cache=False)
    model.train()
    model.merge_adapter()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        with handle.dense():
            expected = model(**batch).logits
        for _ in range(2):
            torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)
    assert len(warnings_of(caplog, "merged")) == 1
    assert handle.last_selection() == {}
    model.unmerge_adapter()
    model(**batch)
    assert handle.last_selection()  # sparse again


# -- 10a: dense forwards are announced and counted --------------------------------------------


def test_dense_calibration_forwards_are_announced_and_counted(caplog):
    model = lora_model(tiny_llama(), ATTN)
    batch = make_batch()  # 36 real tokens; calibration needs 60
    with caplog.at_level(logging.WARNING):
        handle = apply_sparselora(model, WHITENED, use_cache=False)
    assert warnings_of(caplog, "dense")
    model.train()
    model(**batch)
    model(**batch)
    model.eval()
    model(**batch)  # an eval forward is not a dense training step
    model.train()
    model(**batch)  # fitted before this forward, which runs sparse
    assert handle.ready and handle.last_selection()
    window = handle.stats.window()
    assert window["dense_steps"] == 2
    assert handle.stats.window()["dense_steps"] == 2  # a running total, like flops_saved


def test_calibration_that_never_completes_warns_without_flooding(caplog):
    model = lora_model(tiny_llama(), ATTN)
    config = SparseLoRAConfig(ffn_sparsity=0.5, start_step=0.0, calibration_tokens=10**6)
    handle = apply_sparselora(model, config, use_cache=False)
    model.train()
    with caplog.at_level(logging.WARNING):
        for _ in range(12):
            model(**make_batch())
    assert not handle.ready
    assert handle.stats.window()["dense_steps"] == 12
    assert len(warnings_of(caplog, "not ready")) == 1


# -- 10b: whitened estimators are cached per calibration data ---------------------------------


def test_whitened_cache_is_keyed_by_the_calibration_data(tmp_cache):
    model = lora_model(tiny_llama(), ATTN)
    first = apply_sparselora(model, WHITENED, calibration=calibration(10), cache_dir=tmp_cache)
    first.remove()
    assert first.estimator.calibration
    # the same batches, even as a one-shot iterator: loaded from the cache
    same = apply_sparselora(model, WHITENED, calibration=iter(calibration(10)), cache_dir=tmp_cache)
    same.remove()
    assert same.estimator.calibration == first.estimator.calibration
    a, _ = first.estimator.factors[(0, "gate_proj")]
    assert torch.equal(same.estimator.factors[(0, "gate_proj")][0], a)
    # other data: calibrated afresh, cached next to the first
    other = apply_sparselora(model, WHITENED, calibration=calibration(20), cache_dir=tmp_cache)
    assert other.estimator.calibration != first.estimator.calibration
    assert not torch.equal(other.estimator.factors[(0, "gate_proj")][0], a)
    assert len(list(tmp_cache.iterdir())) == 2


def test_calibration_on_training_tokens_is_reused_only_when_asked(tmp_cache):
    model = lora_model(tiny_llama(), ATTN)
    first = apply_sparselora(model, WHITENED, cache_dir=tmp_cache)
    for _ in range(3):
        model(**make_batch())
    assert first.ready
    first.remove()
    fresh = apply_sparselora(model, WHITENED, cache_dir=tmp_cache)
    assert not fresh.ready  # the cache cannot know what this run will train on
    fresh.remove()
    reused = apply_sparselora(model, WHITENED, cache_dir=tmp_cache, reuse_calibration=True)
    assert reused.ready and reused.estimator.calibration == first.estimator.calibration


def test_whitened_cache_files_without_a_calibration_fingerprint_are_not_reused(tmp_cache):
    model = lora_model(tiny_llama(), ATTN)
    first = apply_sparselora(model, WHITENED, calibration=calibration(10), use_cache=False)
    first.remove()
    old = first.estimator
    stale = Estimator(old.factors, old.kind, old.rank, old.fingerprint)  # no calibration
    tmp_cache.mkdir()
    stale.save(tmp_cache / f"{old.fingerprint[:16]}-whitened_svd-r{old.rank}.safetensors")
    for kwargs in ({"calibration": calibration(20)}, {"reuse_calibration": True}):
        handle = apply_sparselora(model, WHITENED, cache_dir=tmp_cache, **kwargs)
        assert handle.estimator is None or handle.estimator.calibration
        handle.remove()


# -- 11: FLOPs saved under gradient checkpointing ---------------------------------------------


@pytest.mark.parametrize(
    "checkpointing", [None, False, True], ids=["off", "non-reentrant", "reentrant"]
)
def test_flops_saved_is_exact_under_gradient_checkpointing(checkpointing):
    model = lora_model(tiny_llama(kv_heads=2), ATTN + MLP)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
        )
    config = SparseLoRAConfig(
        ffn_sparsity={"0-2": 0.5},
        attn_sparsity={"1-2": 0.5},
        estimator="svd",
        estimator_rank=4,
        start_step=0.0,
    )
    handle = apply_sparselora(model, config, use_cache=False)
    model.train()
    length, out, pad, batch_size = 12, 4, 3, 2
    batch = left_padded_batch(length, out, pad, batch_size, torch.Generator().manual_seed(0))
    model(**batch, use_cache=False).loss.backward()
    shape = ModelShape.from_config(model.config)
    common = dict(batch=batch_size, lora_rank=4, lora_targets=ATTN + MLP, pad_tokens=pad)
    lora = step_flops(shape, length, out, **common)
    sparse = step_flops(shape, length, out, config=config, logits_on_output_only=True, **common)
    assert handle.stats.flops_saved == lora["total"] - (sparse["total"] - sparse["estimator"])
