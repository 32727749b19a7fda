"""One way to load a model, resolve a dtype and add LoRA, for training, evaluation, export and
the benchmarks alike.

A model name is an embedded model (`EMBEDDED_MODELS`: the default `EMBEDDED_MODEL` and
`gemma3-270m`, each converted once from an offline GGUF package, see `assets.py`), a local
directory with a `config.json`, or a Hugging Face hub id (`name` or `org/name`). With
`random_weights` it may also be a paper model alias of `sparselora.engine.flops` (`llama3-8b`,
...): the model is then built from its shape with random weights, for speed measurements.

A name that can only be a path (absolute, starting with `.` or `~`, with a backslash, a
trailing `/` or more than one `/`) must exist: it is never sent to the hub. Loaded weights are
checked before use: a truncated safetensors file, a NaN or inf, or a weight beyond
`MAX_ABS_WEIGHT` (a flipped exponent bit) is a `ModelError` naming the file or the weight.

QLoRA (`load_in_4bit`): the projections of the decoder layers load as bitsandbytes 4-bit
(`bnb_4bit_quant_type` nf4 or fp4, double-quantized block scales, compute in the resolved dtype)
on the resolved device; the LM head and embeddings stay float. Then
`peft.prepare_model_for_kbit_training` freezes every weight and casts the remaining bf16/fp16
ones (norms, embeddings, LM head) to float32, as QLoRA does; its gradient checkpointing is not
used (model.gradient_checkpointing decides that, as for a float model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
)

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
QUANT_TYPES_4BIT = ("nf4", "fp4")
# No trained weight comes near this (the largest in the embedded models is 1656, a Gemma-3 norm
# weight); a flip of the top exponent bit of a float32 or bfloat16 weight multiplies it by 2**128.
MAX_ABS_WEIGHT = 1e10


class ModelError(ValueError):
    """A model cannot be used; the message names the path, file or weight and the problem."""


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
    load_in_4bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
) -> nn.Module:
    """The causal LM `name` in `dtype` (see `resolve_dtype`), on `device` if given.

    load_in_4bit: QLoRA, see the module docstring; loaded on `device` (default: 'auto'), as
    bitsandbytes quantizes on the device. Not with `random_weights`.

    random_weights: build the model from its config (or a paper alias's shape) with weights
    drawn from `seed`, initialised directly on `device` (an 8B model is not built on the CPU).
    A family without an sdpa kernel (Gemma 2: its attention logits are soft-capped) asked for
    'sdpa' gets 'eager', with a warning.

    Raises ModelError for a local path that does not exist or holds no config.json, a weights
    file that cannot be read, a model the hub cannot provide, and loaded weights that are not
    finite or beyond `MAX_ABS_WEIGHT`.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    quantization = {}
    if load_in_4bit:
        if random_weights:
            raise ModelError("load_in_4bit needs a checkpoint: it cannot use random_weights")
        device = device or resolve_device("auto")
        quantization = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=bnb_4bit_quant_type,
                bnb_4bit_compute_dtype=torch_dtype,
                bnb_4bit_use_double_quant=True,
            ),
            device_map={"": device},
        )
    if random_weights:
        if name in EMBEDDED_MODELS or _looks_local(name) or Path(name).is_dir():
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
                _local_path(name), dtype=torch_dtype, attn_implementation=attention, **quantization
            )

    try:
        try:
            model = build(attn_implementation)
        except ValueError as err:
            if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(err):
                raise
            logger.warning("%s has no sdpa attention in transformers; using 'eager'", name)
            model = build("eager")
    except SafetensorError as err:
        raise _unreadable_weights(name, err) from None
    except OSError as err:  # transformers: no such hub model, no connection, bad config.json
        raise ModelError(f"cannot load model {name}: {' '.join(str(err).split())}") from err
    if not random_weights:
        _check_weights(model, name)
    if load_in_4bit:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model if device is None else model.to(device)


def load_tokenizer(name: str = EMBEDDED_MODEL):
    """The tokenizer of model `name`, with a pad token (eos when the model defines none).
    Raises ModelError as `load_model` does for a path or hub id that cannot be loaded."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(_local_path(name))
    except OSError as err:
        raise ModelError(
            f"cannot load the tokenizer of {name}: {' '.join(str(err).split())}"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_path(name: str) -> str:
    """An embedded model's cache folder (converted on first use), an existing local folder
    (`~` expanded; it must hold a config.json), else `name` unchanged: a hub id. A name that
    can only be a path (`_looks_local`) and does not exist raises ModelError, with no network."""
    if name in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[name]())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model path {name} is not a folder (a model directory with config.json)"
            )
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {name} has no config.json")
        return str(path)
    if _looks_local(name):
        raise ModelError(f"model directory {name} does not exist")
    return name


def _looks_local(name: str) -> bool:
    """Whether `name` can only be a path: a hub id is `name` or `org/name`, of letters, digits,
    '-', '_' and '.', not starting with '.'."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~", "/"))
        or "\\" in name
        or name.endswith("/")
        or name.count("/") > 1
    )


def _unreadable_weights(name: str, err: SafetensorError) -> ModelError:
    """The ModelError for a safetensors file of model `name` that cannot be read, naming the
    first such file of a local folder."""
    folder = Path(_local_path(name))
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(file, "pt"):
                pass
        except SafetensorError as file_err:
            return ModelError(
                f"{file}: not a readable safetensors file ({file_err}); it is truncated or "
                "corrupt: download or convert it again"
            )
    return ModelError(f"model {name}: a weights file is not readable ({err})")


def _check_weights(model: nn.Module, name: str) -> None:
    """Raise ModelError naming the first floating-point parameter that holds a NaN, an inf or a
    value beyond `MAX_ABS_WEIGHT`: what a damaged or bit-flipped weights file loads as, and
    would train on silently. One min/max pass per parameter."""
    for param_name, param in model.named_parameters():
        if not param.is_floating_point() or param.numel() == 0:
            continue
        low, high = (v.item() for v in torch.aminmax(param.detach()))
        if math.isfinite(low) and math.isfinite(high) and max(-low, high) <= MAX_ABS_WEIGHT:
            continue
        values = param.detach()
        if values.isnan().any():
            what, bad = "NaN", values.isnan()
        elif values.isinf().any():
            bad = values.isinf()
            what = str(values[bad][0].item())
        else:
            bad = values.abs() > MAX_ABS_WEIGHT
            beyond = f"beyond {MAX_ABS_WEIGHT:.0e}, which no trained weight reaches"
            what = f"{values[bad][0].item():.3g} ({beyond})"
        raise ModelError(
            f"{name}: weight {param_name} holds {what} ({int(bad.sum())} of {values.numel()} "
            "values); the weights file is corrupt: download or convert the model again"
        )


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
