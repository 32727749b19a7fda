"""One way to load a model, resolve a dtype and add LoRA, for training, evaluation, export and
the benchmarks alike.

A model name is an embedded model (`EMBEDDED_MODELS`: the default `EMBEDDED_MODEL` and
`gemma3-270m`, each converted once from an offline GGUF package, see `assets.py`), a local
directory with a `config.json`, or a Hugging Face hub id. With
`random_weights` it may also be a paper model alias of `sparselora.engine.flops` (`llama3-8b`,
...): the model is then built from its shape with random weights, for speed measurements.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sparselora.engine.shapes import ModelShape, load_shape
from sparselora.recipes.assets import gemma3_270m_path, smollm2_path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
GEMMA3_MODEL = "gemma3-270m"
# Offline models: alias -> the function that returns its cache folder (converting on first use).
EMBEDDED_MODELS = {EMBEDDED_MODEL: smollm2_path, GEMMA3_MODEL: gemma3_270m_path}
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
METHODS = ("lora", "sparselora")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU. Raises ValueError for a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        device = device if device is not None else resolve_device("auto")
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def llama_config(shape: ModelShape) -> LlamaConfig:
    """A `LlamaConfig` of `shape` with an untied LM head, for models built with random weights."""
    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=False,
    )


def load_model(
    name: str = EMBEDDED_MODEL,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    *,
    device: str | torch.device | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> nn.Module:
    """The causal LM `name` in `dtype` (see `resolve_dtype`), on `device` if given.

    random_weights: build the model from its config (or a paper alias's shape) with weights
    drawn from `seed`, initialised directly on `device` (an 8B model is not built on the CPU).
    A family without an sdpa kernel (Gemma 2: its attention logits are soft-capped) asked for
    'sdpa' gets 'eager', with a warning.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    if random_weights:
        if name in EMBEDDED_MODELS or Path(name).is_dir():
            model_config = AutoConfig.from_pretrained(_local_path(name))
        else:
            model_config = llama_config(load_shape(name))
        torch.manual_seed(seed)

        def build(attention: str) -> nn.Module:
            with device or torch.device("cpu"):
                return AutoModelForCausalLM.from_config(
                    model_config, dtype=torch_dtype, attn_implementation=attention
                )

    else:

        def build(attention: str) -> nn.Module:
            return AutoModelForCausalLM.from_pretrained(
                _local_path(name), dtype=torch_dtype, attn_implementation=attention
            )

    try:
        model = build(attn_implementation)
    except ValueError as err:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(err):
            raise
        logger.warning("%s has no sdpa attention in transformers; using 'eager'", name)
        model = build("eager")
    return model if device is None else model.to(device)


def load_tokenizer(name: str = EMBEDDED_MODEL):
    """The tokenizer of model `name`, with a pad token (eos when the model defines none)."""
    tokenizer = AutoTokenizer.from_pretrained(_local_path(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_path(name: str) -> str:
    """An embedded model's cache folder (converted on first use), else `name` unchanged."""
    if name not in EMBEDDED_MODELS:
        return name
    return str(EMBEDDED_MODELS[name]())


def add_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    target_modules: Sequence[str],
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """Wrap `model` in PEFT LoRA (task CAUSAL_LM); `seed` fixes the adapters' initialisation."""
    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
