"""One model loader for everything: local directories, random weights, attention fallback."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_llama
from transformers import Gemma2Config, Gemma2ForCausalLM

from sparselora.recipes.loading import load_model, resolve_dtype


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    Gemma2ForCausalLM(config).save_pretrained(path)
    return path


def test_a_family_without_sdpa_falls_back_to_eager_with_a_warning(gemma2_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sparselora.recipes.loading"):
        model = load_model(str(gemma2_dir), "float32", "sdpa")
    assert model.config._attn_implementation == "eager"
    assert "no sdpa attention" in caplog.text
    random = load_model(str(gemma2_dir), "float32", "sdpa", random_weights=True)
    assert random.config._attn_implementation == "eager"


def test_sdpa_stays_sdpa_where_the_family_has_it(tmp_path, caplog):
    tiny_llama(layers=2).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sparselora.recipes.loading"):
        model = load_model(str(tmp_path), "float32", "sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert "no sdpa attention" not in caplog.text
    assert load_model(str(tmp_path), "float32", "eager").config._attn_implementation == "eager"


def test_auto_dtype_is_float32_on_the_cpu():
    import torch

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
