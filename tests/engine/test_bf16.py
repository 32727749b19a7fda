"""bfloat16: the sparse model against the masked-dense reference computed in bf16 on the same
model and channels, and against the same reference in float32 (the "truth").

A tiny LLaMA (hidden 32, 2 layers, grouped-query, LoRA on attention and MLP, bf16 base and the
float32 adapters PEFT keeps), FFN sparsity 0.875 and attention sparsity 0.75 on every layer,
default config (exact savings on: the logits are the rows the loss reads).

Tolerances (relative L2; "LoRA grads" is the error of all LoRA gradients taken together):

| comparison                                   | compared    | tol  | why                        |
|----------------------------------------------|-------------|------|----------------------------|
| sparse bf16 vs masked-dense bf16             | loss        | 5e-4 | fp32 loss, mean over tokens|
|                                              | read logits | 2e-2 | a few bf16 roundings       |
|                                              | LoRA grads  | 2e-2 | a few bf16 roundings       |
| error vs fp32 truth: sparse bf16 / dense bf16| LoRA grads  | 1.5x | same math, same roundings  |

bf16 keeps 8 significant bits: each rounding is off by up to 2^-8 = 3.9e-3 relative, and two
layers forward and backward chain a few dozen of them, so two bf16 computations of the same
function agree to ~1e-2 and each is ~1e-2 from the fp32 result (measured: the masked-dense bf16
gradients are 0.7-3.2e-2 from fp32 over 8 seeds x 2 paddings). The sparse path computes the
same function as the masked-dense one with the same rounding points (PEFT adds the float32
LoRA delta to the bf16 base output in float32 and rounds once), so it should be no further
from fp32 than the dense bf16 computation is: the last row. The loss is a float32 mean over
many tokens, far more precise than its inputs; a random model's loss barely depends on the
kept channels, so the logits and gradients carry the check.

The tolerances sit far below the effect of sparsity: the unmasked model, and the same model
keeping as many channels disjoint from the chosen ones, must both differ from the reference by
more than 5x the tolerance (asserted; measured 0.13-0.72), so a sparse path that ran dense or
kept the wrong channels fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ATTN, MLP, lora_model, make_batch
from reference import install_masks, loss_and_grads, rel_err
from transformers import LlamaConfig, LlamaForCausalLM

from sparselora import SparseLoRAConfig, apply_sparselora

LOSS = 5e-4
LOGITS = 2e-2
GRADS = 2e-2
AS_ACCURATE = 1.5  # sparse bf16 error vs fp32 <= this times the dense bf16 error (+ FLOOR)
FLOOR = 1e-3
SIGNAL = 5  # dense and wrong-channel models differ from the reference by >= SIGNAL * tol

CONFIG = SparseLoRAConfig(
    ffn_sparsity=0.875,
    attn_sparsity=0.75,
    estimator="svd",
    ffn_criterion="per_token",
    start_step=0.0,
)
WIDTHS = {  # channels each projection's selection indexes
    "gate_proj": 64,
    "up_proj": 64,
    "down_proj": 64,
    "q_proj": 32,  # 4 heads x 8
    "o_proj": 32,
    "k_proj": 16,  # 2 KV heads x 8
    "v_proj": 16,
}


def tiny_bf16_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(torch.bfloat16)


def masked(model, selection, batch):
    sparse_tokens = torch.ones_like(batch["labels"], dtype=torch.bool)
    sparse_tokens[:, :-1] = batch["labels"][:, 1:] == -100  # dense: predicts a labelled token
    hooks = install_masks(model, selection, sparse_tokens)
    result = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    return result, ~sparse_tokens


def lora_err(grads, ref_grads) -> float:
    """Relative L2 error of all LoRA gradients together (float32 adapters)."""
    names = sorted(n for n in ref_grads if "lora_" in n)
    assert len(names) == 2 * 7 * 2  # A and B of 7 targets in 2 layers
    diff = torch.cat([(grads[n] - ref_grads[n]).flatten() for n in names])
    return (diff.norm() / torch.cat([ref_grads[n].flatten() for n in names]).norm()).item()


def other_channels(selection, seed: int = 0):
    """As many channels per projection as `selection`, none of them kept: a wrong selection."""
    generator = torch.Generator().manual_seed(seed)
    wrong = {}
    for layer, chosen in selection.items():
        wrong[layer] = {}
        for role, keep in chosen.items():
            free = torch.ones(WIDTHS[role], dtype=torch.bool)
            free[keep] = False
            pick = free.nonzero().flatten()[torch.randperm(int(free.sum()), generator=generator)]
            wrong[layer][role] = pick[: len(keep)].sort().values
    return wrong


def run(padding):
    """Sparse bf16, masked-dense bf16 and masked-dense fp32 (same channels), the unmasked
    bf16 model, and the bf16 reference of a wrong selection."""
    model = lora_model(tiny_bf16_llama(), ATTN + MLP)
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    truth_model = copy.deepcopy(model).float()  # bf16 weights are exact in float32
    batch = make_batch(length=10, padding=padding)
    dense = loss_and_grads(model, batch)
    handle = apply_sparselora(model, CONFIG, use_cache=False)
    sparse = loss_and_grads(model, batch)
    selection = handle.last_selection()
    assert sorted(selection) == [0, 1] and "k_proj" in selection[1]
    assert len(selection[0]["gate_proj"]) == 8  # 1/8 of 64
    handle.remove()
    ref, read = masked(model, selection, batch)
    truth, _ = masked(truth_model, selection, batch)
    wrong, _ = masked(model, other_channels(selection), batch)
    assert sparse[1].dtype == ref[1].dtype == torch.bfloat16 and truth[1].dtype == torch.float32
    return sparse, ref, truth, dense, wrong, read


@pytest.mark.parametrize("padding", ["left", "right"])
def test_bf16_sparse_matches_masked_dense_bf16(padding):
    sparse, ref, _, dense, wrong, read = run(padding)
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = sparse, ref
    assert rel_err(loss, ref_loss) < LOSS
    assert logits.shape == (int(read.sum()), 97)  # exact savings: the rows the loss reads
    read_logits = ref_logits[read].float()
    assert rel_err(logits.float(), read_logits) < LOGITS
    grads_err = lora_err(grads, ref_grads)
    assert grads_err < GRADS
    for name, control in (("dense", dense), ("wrong channels", wrong)):
        # the check can tell the sparse model from the dense one and from other channels
        control_logits = rel_err(control[1][read].float(), read_logits)
        control_grads = lora_err(control[2], ref_grads)
        assert control_logits > SIGNAL * LOGITS, (name, control_logits)
        assert control_grads > SIGNAL * GRADS, (name, control_grads)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_bf16_sparse_is_as_accurate_as_dense_bf16(padding):
    """Against float32 on the same channels, sparse bf16 loses no more than dense bf16 does."""
    sparse, ref, truth, dense, _, _ = run(padding)
    sparse_err, dense_err = lora_err(sparse[2], truth[2]), lora_err(ref[2], truth[2])
    assert 1e-3 < dense_err < 5e-2, dense_err  # bf16 really rounds, and only by a few units of 2^-8
    unmasked_err = lora_err(dense[2], truth[2])
    assert unmasked_err > SIGNAL * GRADS  # the truth is really sparse
    assert sparse_err < AS_ACCURATE * dense_err + FLOOR, (sparse_err, dense_err)
