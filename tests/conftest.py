"""Shared fixtures: tiny random LLaMA-family models wrapped in PEFT LoRA, and batches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from sparselora import SparseLoRAConfig
from sparselora.recipes.loading import load_tokenizer
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.train import train

torch.set_num_threads(2)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Exact savings off: full logits come back, so channel-sparsity tests can compare every position.
CHANNELS_ONLY = {"labelled_logits": False, "skip_unread_last_layer": False}
# The exact-savings tests' configs: no channel sparsity, and sparse layers around the savings.
NO_SPARSITY = {"ffn_sparsity": {}, "attn_sparsity": {}}
SAVINGS_SPARSE = {
    "ffn_sparsity": {"0-2": 0.5},
    "attn_sparsity": {"1-2": 0.5},
    "estimator": "svd",
    "ffn_criterion": "per_token",
    "start_step": 0.0,
}


def tiny_llama(
    kv_heads: int = 2,
    bias: bool = False,
    attn_impl: str = "sdpa",
    layers: int = 3,
    seed: int = 0,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_impl
    model = LlamaForCausalLM(config)
    if bias:  # random init leaves biases at zero; make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.5)
    return model.float()


def lora_model(model, targets=ATTN, seed: int = 1):
    """PEFT LoRA with non-zero B, so adapters affect outputs and gradients."""
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    )
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return peft_model


def make_batch(
    batch: int = 3,
    length: int = 12,
    padding: str | None = None,
    seed: int = 2,
    out_tokens: int | None = None,
):
    """Random token ids; the last few tokens of each row are the output (labels != -100):
    3, 4, 5 ... in rows 0, 1, 2 ..., or `out_tokens` in every row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100)
    for row in range(batch):
        pad = 0 if padding is None else row * 2  # rows padded by 0, 2, 4 ... tokens
        out = 3 + row if out_tokens is None else out_tokens
        if padding == "left":
            attention_mask[row, :pad] = 0
            input_ids[row, :pad] = 0
            labels[row, length - out :] = input_ids[row, length - out :]
        else:
            end = length - pad
            attention_mask[row, end:] = 0
            input_ids[row, end:] = 0
            labels[row, end - out : end] = input_ids[row, end - out : end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sparse_config(channels_only: bool = True, **overrides) -> SparseLoRAConfig:
    """FFN sparsity on layers 0-2 and attention on 1-2 (half the channels), the weight-only SVD
    estimator, sparse from step 0; exact savings off unless `channels_only` is False."""
    fields = dict(
        ffn_sparsity={"0-2": 0.5},
        attn_sparsity={"1-2": 0.5},
        estimator="svd",
        ffn_criterion="per_token",
        start_step=0.0,
        **(CHANNELS_ONLY if channels_only else {}),
    )
    fields.update(overrides)
    return SparseLoRAConfig(**fields)


def left_padded_batch(length=12, out=4, pad=3, batch_size=2, generator=None) -> dict:
    """Random ids, every row left-padded by `pad` and labelled on its last `out` tokens: the
    batch the FLOPs counter is checked on (the same padding in every row)."""
    input_ids = torch.randint(3, 97, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[:, :pad] = 0
    labels = torch.full((batch_size, length), -100)
    labels[:, -out:] = input_ids[:, -out:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def measured_step(model, batch) -> int:
    """FLOPs of one forward + backward as PyTorch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


@pytest.fixture
def tmp_cache(tmp_path):
    return tmp_path / "estimators"


def save_tiny_llama(path, layers: int, hidden: int) -> None:
    """A tiny random LLaMA (FFN 2 x hidden, 4 heads, 2 KV heads) with SmolLM2's tokenizer,
    saved as a local model directory `path`, as a user's checkpoint would be."""
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def train_tiny_run(root, layers: int, hidden: int, *overrides: str):
    """A finished run folder root/run: a tiny local LLaMA (`save_tiny_llama`) trained 2 steps on
    eight LLM-Adapters-style math rows (root/math.json), SparseLoRA FFN 0.5; `overrides` are
    further run-config `section.key=value` items. Returns the run folder."""
    save_tiny_llama(root / "tiny", layers=layers, hidden=hidden)
    rows = [
        {"instruction": f"What is {a} plus 1?", "input": "", "output": f"{a + 1}", "answer": str(a + 1)}
        for a in range(8)
    ]  # fmt: skip
    (root / "math.json").write_text(json.dumps(rows))
    train(RunConfig.load(None, [
        f"model.name={root / 'tiny'}", f"data.train={root / 'math.json'}", "data.max_length=64",
        f"training.output_dir={root / 'run'}", "training.batch_size=4", "training.max_steps=2",
        "logging.tensorboard=false", "sparselora.preset=null", "sparselora.ffn_sparsity=0.5",
        "sparselora.calibration_tokens=1", *overrides,
    ]))  # fmt: skip
    return root / "run"


def load_benchmark(name: str):
    """benchmarks/<name>.py (a script folder, not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
