"""Tests for the offline assets: GSM8K loading/splitting and the SmolLM2 cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sparselora.recipes import assets

NUMBER = re.compile(r"-?\d+(\.\d+)?")


def test_load_gsm8k_has_all_test_problems_with_numeric_answers():
    rows = assets.load_gsm8k()
    assert len(rows) == assets.GSM8K_TEST_SIZE == 1319
    for row in rows:
        assert set(row) == {"question", "answer", "final_answer"}
        assert row["question"].strip() and row["answer"].strip()
        assert NUMBER.fullmatch(row["final_answer"]), row["final_answer"]
        assert row["answer"].replace(",", "").rstrip().endswith("#### " + row["final_answer"])
    # Known rows: a plain answer and one written with a thousands separator.
    assert rows[0]["final_answer"] == "18"
    assert rows[2]["answer"].endswith("#### 70000")
    assert any("," in row["answer"].rsplit("####", 1)[-1] for row in rows)


def test_gsm8k_split_is_deterministic_disjoint_and_complete():
    all_questions = [row["question"] for row in assets.load_gsm8k()]
    assert len(set(all_questions)) == len(all_questions)  # questions identify rows

    train, held_out = assets.gsm8k_split(seed=3, eval_size=150)
    train_again, held_out_again = assets.gsm8k_split(seed=3, eval_size=150)
    assert train == train_again and held_out == held_out_again
    assert len(held_out) == 150 and len(train) == len(all_questions) - 150

    train_q = {row["question"] for row in train}
    eval_q = {row["question"] for row in held_out}
    assert train_q.isdisjoint(eval_q)
    assert train_q | eval_q == set(all_questions)

    _, other_eval = assets.gsm8k_split(seed=4, eval_size=150)
    assert {row["question"] for row in other_eval} != eval_q


def test_gsm8k_split_rejects_bad_eval_size():
    with pytest.raises(ValueError, match="eval_size"):
        assets.gsm8k_split(eval_size=2000)


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the real (tens of seconds) conversion by one that writes a stamp file.

    Returns the list of folders it was asked to build into.
    """
    calls: list[Path] = []

    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "weights.txt").write_text(f"build {len(calls)}")

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    return calls


def _leftovers(cache_root: Path) -> list[str]:
    """Temporary build folders left next to the cache folder."""
    return [p.name for p in (cache_root / "models").iterdir() if p.name.startswith(".")]


def test_smollm2_cache_is_built_once_then_reused(tmp_path, fake_conversion):
    path = assets.smollm2_path(tmp_path)
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert (path / "weights.txt").read_text() == "build 1"
    marker = json.loads((path / assets.MARKER_NAME).read_text())
    assert marker["fingerprint"] == assets._smollm2_fingerprint(assets.smollm2_gguf_file())

    assert assets.smollm2_path(tmp_path) == path
    assert len(fake_conversion) == 1
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["mismatched_marker", "missing_marker", "garbled_marker"])
def test_smollm2_broken_cache_is_rebuilt(tmp_path, fake_conversion, damage):
    path = assets.smollm2_path(tmp_path)
    marker = path / assets.MARKER_NAME
    if damage == "mismatched_marker":
        marker.write_text(json.dumps({"fingerprint": "0" * 64}))
    elif damage == "missing_marker":
        marker.unlink()
    else:
        marker.write_text("{not json")
    (path / "partial.bin").write_text("left over from an interrupted build")

    assert assets.smollm2_path(tmp_path) == path
    assert len(fake_conversion) == 2
    assert (path / "weights.txt").read_text() == "build 2"
    assert not (path / "partial.bin").exists()  # the old folder was replaced, not patched
    assert assets._marker_matches(path, assets._smollm2_fingerprint(assets.smollm2_gguf_file()))
    assert _leftovers(tmp_path) == []


def test_smollm2_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def convert(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "weights.txt").write_text("half written")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    with pytest.raises(RuntimeError, match="conversion failed"):
        assets.smollm2_path(tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
    assert _leftovers(tmp_path) == []


def test_smollm2_cache_dir_defaults_to_env(tmp_path, monkeypatch, fake_conversion):
    monkeypatch.setenv("SPARSELORA_CACHE", str(tmp_path / "env-cache"))
    assert assets.default_cache_dir() == tmp_path / "env-cache"
    assert assets.smollm2_path() == tmp_path / "env-cache" / "models" / "smollm2-135m-instruct"


@pytest.mark.slow
def test_load_smollm2_real_model(monkeypatch):
    # Default cache dir on purpose: the ~30 s conversion is paid once per machine, not per run.
    model, tokenizer = assets.load_smollm2()

    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    assert getattr(config, "quantization_config", None) is None
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.pad_token is not None and tokenizer.chat_template

    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        logits = model(**inputs).logits  # (1, T, vocab)
    reply = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()

    def no_conversion(gguf_file: Path, out_dir: Path) -> None:
        raise AssertionError("second load must come from the cache, not convert again")

    monkeypatch.setattr(assets, "_convert_smollm2", no_conversion)
    model_again, _ = assets.load_smollm2()
    with torch.no_grad():
        logits_again = model_again(**inputs).logits
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=0)
