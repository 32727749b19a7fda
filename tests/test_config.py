"""SparseLoRAConfig validation, files and presets."""

from __future__ import annotations

import pytest

from sparselora import PRESETS, ConfigError, SparseLoRAConfig, get_preset
from sparselora.config import parse_layer_spec, resolve_layers


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({"ffn_sparsity": 1.0}, "ffn_sparsity"),
        ({"ffn_sparsity": {"3-5": -0.1}}, "ffn_sparsity"),
        ({"attn_sparsity": {"a-b": 0.5}}, "attn_sparsity"),
        ({"attn_sparsity": {"5-3": 0.5}}, "attn_sparsity"),
        ({"estimator": "pca"}, "estimator"),
        ({"ffn_criterion": "wanda"}, "ffn_criterion"),
        ({"attn_criterion": "head"}, "attn_criterion"),
        ({"estimator_rank": 0}, "estimator_rank"),
        ({"start_step": 1.5}, "start_step"),
        ({"start_step": 0.5, "end_step": 0.2}, "start_step"),
        ({"output_tokens": "some"}, "output_tokens"),
        ({"detach_sparse_base": "yes"}, "detach_sparse_base"),
        ({"estimator": ["svd"]}, "estimator"),
        ({"calibration_damping": "1e-3"}, "calibration_damping"),
        ({"calibration_damping": float("inf")}, "calibration_damping"),
        ({"preset": 5}, "preset"),
    ],
)
def test_bad_values_name_the_field(fields, field_name):
    with pytest.raises(ConfigError, match=field_name):
        SparseLoRAConfig(**fields)


def test_sparsity_error_states_the_allowed_range():
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        SparseLoRAConfig(ffn_sparsity={"0": 1.2})


def test_unknown_field_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="ffn_sparsty.*allowed"):
        SparseLoRAConfig.from_dict({"ffn_sparsty": 0.5})


def test_layer_specs():
    assert parse_layer_spec("3,5,7-9") == [3, 5, 7, 8, 9]
    assert parse_layer_spec(4) == [4]
    assert parse_layer_spec("all") is None
    resolved = resolve_layers("ffn_sparsity", {"all": 0.5, "2": 0.9, "0": 0.0}, 4)
    assert resolved == {1: 0.5, 2: 0.9, 3: 0.5}
    with pytest.raises(ConfigError, match="layer 32.*32 layers"):
        resolve_layers("ffn_sparsity", {"13-40": 0.9}, 32)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    config = SparseLoRAConfig(
        ffn_sparsity={"3-30": 0.99}, attn_sparsity={"14-19,21": 0.75}, estimator_rank=16, seed=3
    )
    path = tmp_path / f"sparse{suffix}"
    config.save(path)
    assert SparseLoRAConfig.load(path) == config


def test_every_paper_preset_loads_and_fits_its_model():
    assert len(PRESETS) == 13  # 10 of the paper, 2 measured on SmolLM2, 1 on Gemma-3-270M
    for name, preset in PRESETS.items():
        config = get_preset(name)
        assert config.preset == name and config.estimator == "whitened_svd"
        paper = get_preset(name + ":paper")
        assert (paper.estimator, paper.estimator_rank, paper.ffn_criterion) == (
            "svd",
            8,
            "seq_mean",
        )
        assert paper.ffn_sparsity == config.ffn_sparsity
        ffn, attn = config.layer_sparsity(preset.num_layers)
        assert ffn and (attn or name == "smollm2-135m-gsm8k")  # ours is FFN only


def test_preset_values_match_the_paper_table():
    ffn, attn = get_preset("llama3-8b-math10k").layer_sparsity(32)
    assert ffn == {i: 0.99 for i in range(3, 31)}
    a14 = [*range(14, 20), 21, 22, 23, *range(25, 30)]
    assert attn == {i: 0.75 for i in a14}
    ffn, _ = get_preset("llama3-8b-glue").layer_sparsity(32)
    assert ffn[31] == 0.5 and ffn[17] == 0.95
    assert get_preset("llama2-13b-csr").start_step == 0.10


def test_preset_with_overrides_and_unknown_preset():
    config = SparseLoRAConfig.from_preset("llama3-8b-csr", estimator="whitened_svd")
    assert config.estimator == "whitened_svd" and config.ffn_sparsity == {"17-30": 0.97}
    with pytest.raises(ConfigError, match="unknown preset.*llama3-8b-csr"):
        get_preset("llama9")


def test_compact_layers_round_trips_and_merges_runs():
    from sparselora.config import compact_layers

    per_layer = {3: 0.9, 4: 0.9, 5: 0.9, 6: 0.5, 9: 0.5, 10: 0.5}
    spec = compact_layers(per_layer)
    assert spec == {"3-5": 0.9, "6": 0.5, "9-10": 0.5}
    assert resolve_layers("ffn_sparsity", spec, 12) == per_layer


def test_at_depth_moves_a_preset_by_relative_depth():
    config = get_preset("llama3-8b-math10k")  # FFN 3-30 of 32, attention 14-19,21-23,25-29
    same = config.at_depth(32, 32)
    assert same.layer_sparsity(32) == config.layer_sparsity(32)
    deeper = config.at_depth(32, 36)
    ffn, attn = deeper.layer_sparsity(36)
    # target j takes source round(j * 31 / 35): j=3 -> 2.66 -> 3 (sparse), j=2 -> 1.77 -> 2
    # (dense), j=34 -> 30.1 -> 30 (sparse), j=35 -> 31 (dense, the last layer stays dense)
    assert min(ffn) == 3 and max(ffn) == 34 and set(ffn.values()) == {0.99}
    assert 35 not in ffn and 35 not in attn
    # attention 14-19 -> j = 16..22 (j=15 -> 13.3 -> 13 is dense, j=23 -> 20.4 -> 20 is dense)
    assert [j for j in range(15, 24) if j in attn] == list(range(16, 23))
    assert deeper.preset == "llama3-8b-math10k" and deeper.start_step == config.start_step
