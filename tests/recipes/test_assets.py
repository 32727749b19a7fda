"""Tests for the offline assets: GSM8K loading/splitting and the SmolLM2 and Gemma-3-270M caches."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

from sparselora.recipes import assets, loading
from tests.conftest import save_tiny_llama

NUMBER = re.compile(r"-?\d+(\.\d+)?")
# Gemma-3-270M: SDPA vs eager hidden states, relative error in norm (float32, CPU);
# its loss on the first GSM8K problem, in nats per token (measured 3.05), is below this.
SDPA_RTOL = 1e-5
LOSS_BOUND = 4.0


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


needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(assets.GEMMA3_PACKAGE) is None,
    reason=f"Gemma-3-270M needs the '{assets.GEMMA3_DIST}' package (see requirements.txt)",
)

# (path function, its asset, the import name whose absence means "package not installed")
MODEL_ASSETS = [
    pytest.param(assets.smollm2_path, assets.SMOLLM2, assets.SMOLLM2_PACKAGE, id="smollm2"),
    pytest.param(
        assets.gemma3_270m_path,
        assets.GEMMA3_270M,
        assets.GEMMA3_PACKAGE,
        id="gemma3-270m",
        marks=needs_gemma,
    ),
]


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the real (tens of seconds to minutes) conversion by one that writes a stamp file.

    Returns the list of folders it was asked to build into.
    """
    calls: list[Path] = []

    def convert(asset: assets.GGUFAsset, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "weights.txt").write_text(f"build {len(calls)}")

    monkeypatch.setattr(assets, "_convert", convert)
    return calls


def _leftovers(cache_root: Path) -> list[str]:
    """Temporary build folders left next to the cache folder."""
    return [p.name for p in (cache_root / "models").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("model_path", "asset", "package"), MODEL_ASSETS)
def test_cache_is_built_once_then_reused(tmp_path, fake_conversion, model_path, asset, package):
    path = model_path(tmp_path)
    assert path == tmp_path / "models" / asset.name
    assert (path / "weights.txt").read_text() == "build 1"
    marker = json.loads((path / assets.MARKER_NAME).read_text())
    assert marker["fingerprint"] == assets._fingerprint(asset)
    assert marker["asset"] == asset.name and marker["source"]["dist"] == asset.dist

    assert model_path(tmp_path) == path
    assert len(fake_conversion) == 1
    assert _leftovers(tmp_path) == []


def test_smollm2_fingerprint_is_unchanged_by_the_shared_conversion():
    """Caches converted before Gemma joined keep their marker: same source fields, same hash."""
    gguf_file = assets.smollm2_gguf_file()
    source = {
        "file": gguf_file.name,
        "size": gguf_file.stat().st_size,
        "package_version": importlib.metadata.version(assets.SMOLLM2_DIST),
        "cache_format": assets.CACHE_FORMAT,
    }
    expected = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    assert assets._fingerprint(assets.SMOLLM2) == expected


@pytest.mark.parametrize(("model_path", "asset", "package"), MODEL_ASSETS)
@pytest.mark.parametrize("damage", ["mismatched_marker", "missing_marker", "garbled_marker"])
def test_broken_cache_is_rebuilt(tmp_path, fake_conversion, damage, model_path, asset, package):
    path = model_path(tmp_path)
    marker = path / assets.MARKER_NAME
    if damage == "mismatched_marker":
        marker.write_text(json.dumps({"fingerprint": "0" * 64}))
    elif damage == "missing_marker":
        marker.unlink()
    else:
        marker.write_text("{not json")
    (path / "partial.bin").write_text("left over from an interrupted build")

    assert model_path(tmp_path) == path
    assert len(fake_conversion) == 2
    assert (path / "weights.txt").read_text() == "build 2"
    assert not (path / "partial.bin").exists()  # the old folder was replaced, not patched
    assert assets._marker_matches(path, assets._fingerprint(asset))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(("model_path", "asset", "package"), MODEL_ASSETS)
def test_complete_cache_is_used_without_the_source_package(
    tmp_path, monkeypatch, fake_conversion, model_path, asset, package
):
    path = model_path(tmp_path)
    monkeypatch.setitem(sys.modules, package, None)  # import and find_spec now see no package
    with pytest.raises(ModuleNotFoundError, match=asset.dist):
        assets._fingerprint(asset)

    assert model_path(tmp_path) == path
    assert len(fake_conversion) == 1

    marker = path / assets.MARKER_NAME
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "cache_format": 0}))
    with pytest.raises(FileNotFoundError, match=asset.dist):
        model_path(tmp_path)  # an old-format cache cannot be rebuilt without the package
    marker.unlink()
    with pytest.raises(FileNotFoundError, match=asset.dist):
        model_path(tmp_path)  # nor can an incomplete one
    with pytest.raises(FileNotFoundError, match=asset.dist):
        model_path(tmp_path / "empty")


def _hide_package(monkeypatch, tmp_path: Path, asset: assets.GGUFAsset, how: str) -> None:
    """Make the asset's source package unusable the way a user's environment can.

    no_module: not installed (imports and ``find_spec`` see nothing); no_metadata: importable
    but without its distribution metadata; no_gguf: an install whose folder lacks the GGUF file
    (a half-removed or broken install found first on ``sys.path``).
    """
    package = assets.SMOLLM2_PACKAGE if asset is assets.SMOLLM2 else assets.GEMMA3_PACKAGE
    if how == "no_module":
        monkeypatch.setitem(sys.modules, package, None)
    elif how == "no_metadata":
        real_version = importlib.metadata.version

        def version(dist: str) -> str:
            if dist == asset.dist:
                raise importlib.metadata.PackageNotFoundError(dist)
            return real_version(dist)

        monkeypatch.setattr(importlib.metadata, "version", version)
    else:
        (tmp_path / "site" / package).mkdir(parents=True)
        (tmp_path / "site" / package / "__init__.py").write_text("")
        monkeypatch.delitem(sys.modules, package, raising=False)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))


def _fake_converted_cache(cache_root: Path, asset: assets.GGUFAsset) -> Path:
    """A tiny model where the asset's converted checkpoint goes, with a marker written on
    another machine (its fingerprint cannot be recomputed here)."""
    folder = cache_root / "models" / asset.name
    save_tiny_llama(folder, layers=1, hidden=16)
    marker = {"asset": asset.name, "fingerprint": "f" * 64, "cache_format": assets.CACHE_FORMAT}
    (folder / assets.MARKER_NAME).write_text(json.dumps(marker))
    return folder


ABSENT = [
    pytest.param(assets.SMOLLM2, how, id=f"smollm2-{how}")
    for how in ("no_module", "no_metadata", "no_gguf")
] + [
    pytest.param(assets.GEMMA3_270M, how, id=f"gemma3-270m-{how}", marks=needs_gemma)
    for how in ("no_module", "no_metadata")
]


@pytest.mark.parametrize(("asset", "how"), ABSENT)
def test_converted_model_loads_without_its_package(tmp_path, monkeypatch, asset, how):
    cache = tmp_path / "cache"
    folder = _fake_converted_cache(cache, asset)

    def no_conversion(asset: assets.GGUFAsset, out_dir: Path) -> None:
        raise AssertionError("the converted cache must be used, not rebuilt")

    monkeypatch.setattr(assets, "_convert", no_conversion)
    monkeypatch.setenv("SPARSELORA_CACHE", str(cache))
    _hide_package(monkeypatch, tmp_path, asset, how)
    with pytest.raises(FileNotFoundError if how == "no_gguf" else ModuleNotFoundError):
        assets._fingerprint(asset)  # the source really is unusable

    assert assets.asset_path(asset) == folder
    model = loading.load_model(asset.name)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 16
    assert loading.load_tokenizer(asset.name).pad_token is not None
    if asset is assets.SMOLLM2:
        model, tokenizer = assets.load_smollm2(cache)
        assert model.config.hidden_size == 16 and tokenizer.pad_token is not None


@pytest.mark.parametrize(("asset", "how"), ABSENT)
def test_no_package_and_no_cache_is_one_clear_error(tmp_path, monkeypatch, asset, how):
    _hide_package(monkeypatch, tmp_path, asset, how)
    with pytest.raises(FileNotFoundError) as error:
        assets.asset_path(asset, tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "cache" / "models" / asset.name) in message
    if how == "no_module":
        assert "pip install" in message and asset.dist in message
    assert not (tmp_path / "cache" / "models" / asset.name).exists()


@pytest.mark.parametrize(("model_path", "asset", "package"), MODEL_ASSETS)
def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch, model_path, asset, package):
    def convert(asset: assets.GGUFAsset, out_dir: Path) -> None:
        (out_dir / "weights.txt").write_text("half written")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(assets, "_convert", convert)
    with pytest.raises(RuntimeError, match="conversion failed"):
        model_path(tmp_path)
    assert not (tmp_path / "models" / asset.name).exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(("model_path", "asset", "package"), MODEL_ASSETS)
def test_cache_dir_defaults_to_env(
    tmp_path, monkeypatch, fake_conversion, model_path, asset, package
):
    monkeypatch.setenv("SPARSELORA_CACHE", str(tmp_path / "env-cache"))
    assert assets.default_cache_dir() == tmp_path / "env-cache"
    assert model_path() == tmp_path / "env-cache" / "models" / asset.name


def test_embedded_aliases_name_the_asset_folders(tmp_path, monkeypatch, fake_conversion):
    monkeypatch.setenv("SPARSELORA_CACHE", str(tmp_path))
    assert set(loading.EMBEDDED_MODELS) == {loading.EMBEDDED_MODEL, loading.GEMMA3_MODEL}
    assert loading._local_path("some/hub-id") == "some/hub-id"
    assert loading._local_path(loading.EMBEDDED_MODEL) == str(assets.smollm2_path())
    if importlib.util.find_spec(assets.GEMMA3_PACKAGE) is not None:
        assert loading._local_path("gemma3-270m") == str(tmp_path / "models" / "gemma3-270m")


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

    def no_conversion(asset: assets.GGUFAsset, out_dir: Path) -> None:
        raise AssertionError("second load must come from the cache, not convert again")

    monkeypatch.setattr(assets, "_convert", no_conversion)
    model_again, _ = assets.load_smollm2()
    with torch.no_grad():
        logits_again = model_again(**inputs).logits
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=0)


# -- Gemma-3-270M, the real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_checkpoint() -> Path:
    # Default cache dir on purpose, as for SmolLM2: the conversion (about 3 minutes on 2 busy CPU
    # cores) is paid once per machine, not per run.
    return assets.gemma3_270m_path()


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The GGUF reassembled into a temporary folder, and the model transformers loads from it."""
    gguf_file = assets._gemma3_gguf_file(tmp_path_factory.mktemp("gemma3-gguf"))
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    return gguf_file, model


@needs_gemma
@pytest.mark.slow
def test_gemma3_270m_conversion_matches_the_gguf(gemma3_checkpoint, gemma3_gguf):
    gguf_file, gguf_model = gemma3_gguf
    converted = Gemma3ForCausalLM.from_pretrained(
        gemma3_checkpoint, dtype=torch.float32, local_files_only=True
    )
    config = converted.config
    reader = GGUFReader(gguf_file)
    meta = {key: field.contents() for key, field in reader.fields.items()}

    assert config.model_type == "gemma3_text" and meta["general.architecture"] == "gemma3"
    assert getattr(config, "quantization_config", None) is None
    shape = (
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.sliding_window,
        config.max_position_embeddings,
        config.vocab_size,
    )
    gguf_shape = (
        meta["gemma3.block_count"],
        meta["gemma3.embedding_length"],
        meta["gemma3.feed_forward_length"],
        meta["gemma3.attention.head_count"],
        meta["gemma3.attention.head_count_kv"],
        meta["gemma3.attention.key_length"],
        meta["gemma3.attention.sliding_window"],
        meta["gemma3.context_length"],
        len(reader.fields["tokenizer.ggml.tokens"].data),
    )
    assert shape == gguf_shape == (18, 640, 2048, 4, 1, 256, 512, 32768, 262144)
    assert config.rms_norm_eps == pytest.approx(meta["gemma3.attention.layer_norm_rms_epsilon"])
    assert config.rope_parameters["full_attention"]["rope_theta"] == meta["gemma3.rope.freq_base"]
    # Not in the GGUF; llama.cpp hard-codes them for Gemma 3, and so do transformers' defaults:
    # local RoPE base 10k on sliding layers, every 6th layer global, no soft-capping.
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000
    assert config.layer_types == [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)
    ]
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    assert config.query_pre_attn_scalar == 256
    assert config.hidden_activation == "gelu_pytorch_tanh"  # GeGLU
    assert config.tie_word_embeddings
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()

    input_ids = torch.randint(0, config.vocab_size, (2, 24))  # (B, T), fresh every run
    with torch.no_grad():
        expected = gguf_model(input_ids).logits  # (B, T, vocab)
        actual = converted(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=assets.CONVERSION_ATOL)


@needs_gemma
@pytest.mark.slow
def test_gemma3_270m_cache_is_reused(gemma3_checkpoint, monkeypatch):
    marker = gemma3_checkpoint / assets.MARKER_NAME
    before = (marker.read_bytes(), marker.stat().st_mtime_ns)

    def no_conversion(asset: assets.GGUFAsset, out_dir: Path) -> None:
        raise AssertionError("a complete cache must be reused, not converted again")

    monkeypatch.setattr(assets, "_convert", no_conversion)
    start = time.perf_counter()
    assert assets.gemma3_270m_path() == gemma3_checkpoint
    assert time.perf_counter() - start < 1.0  # a marker read, not a reassembly
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == before


@needs_gemma
@pytest.mark.slow
def test_gemma3_270m_loads_by_alias(gemma3_checkpoint):
    model = loading.load_model("gemma3-270m", "float32")
    tokenizer = loading.load_tokenizer("gemma3-270m")
    assert isinstance(model, Gemma3ForCausalLM) and not model.training
    assert model.config._attn_implementation == "sdpa"
    # A base model: no chat template; its own pad token, distinct from eos; bos is prepended.
    assert tokenizer.chat_template is None
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.model_max_length == model.config.max_position_embeddings

    row = assets.load_gsm8k()[0]
    batch = tokenizer(row["question"] + "\n" + row["answer"], return_tensors="pt")
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
        generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    # Random weights give ln(262144) = 12.5 nats; the real model reads GSM8K far better.
    assert loss < LOSS_BOUND, loss
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    assert "return" in reply, reply


@needs_gemma
@pytest.mark.slow
def test_gemma3_270m_sdpa_matches_eager_across_the_sliding_window(gemma3_checkpoint):
    sdpa = loading.load_model("gemma3-270m", "float32", "sdpa")
    eager = loading.load_model("gemma3-270m", "float32", "eager")
    window = eager.config.sliding_window
    input_ids = torch.randint(0, eager.config.vocab_size, (1, window + 100))  # (1, T), T > window
    with torch.no_grad():
        expected = eager.model(input_ids).last_hidden_state[0, window:]  # (T - window, hidden)
        actual = sdpa.model(input_ids).last_hidden_state[0, window:]
        eager.config.sliding_window = window - 1  # the masks are built from the config per call
        off_by_one = eager.model(input_ids).last_hidden_state[0, window:]

    def relative_error(hidden: torch.Tensor) -> float:
        return ((hidden - expected).norm() / expected.norm()).item()

    # float32 kernels reduce in different orders (measured 1-3e-6), while a window one token
    # shorter changes the positions past it by 1e-3 or more: SDPA applies the same window.
    assert relative_error(actual) <= SDPA_RTOL
    assert relative_error(off_by_one) > 20 * SDPA_RTOL
