"""Mistral and Qwen2 (q/k/v biases) against the masked-dense reference, as LLaMA is in
test_sparse_equivalence.py: grouped-query attention, LoRA on attention and MLP, FFN and
attention sparsity, left and right padding (fp32).

Tolerances (relative L2):

| comparison                                                  | compared            | tol  |
|-------------------------------------------------------------|---------------------|------|
| sparse, exact savings off, vs masked-dense reference        | loss, logits, grads | 1e-5 |
| sparse, exact savings on (default), vs masked-dense ref.    | loss, read logits,  | 1e-5 |
|                                                             | grads               |      |
| after `handle.remove()` vs before `apply_sparselora`        | logits              | 0    |

"grads" is every LoRA parameter's gradient and the input-embedding gradient. The reference's
logits and every gradient must differ from the unmasked model's by more than 1e-2 (1000x the
tolerance), so a sparse path that silently ran dense would fail. The loss of a random model
barely depends on the kept channels (relative change ~1e-4), so it is compared but not relied on.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, CHANNELS_ONLY, MLP, lora_model, make_batch, sparse_config
from reference import install_masks, loss_and_grads, rel_err
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sparselora import SparseLoRAConfig, apply_sparselora

SPARSE = 1e-5
REALLY_SPARSE = 1e-2  # the reference's logits and grads move at least this far from dense
LAYERS = 3
KV_HEADS = 2
HEAD_DIM = 16  # hidden 64 / 4 heads

FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(family: str, seed: int = 0):
    """A random 3-layer grouped-query model; Qwen2's q/k/v biases are made non-zero."""
    config_class, model_class = FAMILIES[family]
    config = config_class(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_class(config)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert bool(biases) == (family == "qwen2")  # Qwen2: q/k/v only; Mistral: none
    for param in biases:  # random init leaves biases at zero; make them matter
        torch.nn.init.normal_(param, std=0.5)
    return model.float()


def config(**overrides) -> SparseLoRAConfig:
    return sparse_config(channels_only=False, **overrides)


def sparse_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position t is dense only when it predicts a labelled token t + 1."""
    sparse = torch.ones_like(labels, dtype=torch.bool)
    sparse[:, :-1] = labels[:, 1:] == -100
    return sparse


def sparse_and_reference(family: str, padding: str, cfg: SparseLoRAConfig):
    """(sparse result, masked-dense reference, unmasked dense result, batch), each result
    (loss, logits, grads) on the same model and batch."""
    model = lora_model(tiny_model(family), ATTN + MLP)
    batch = make_batch(padding=padding)
    dense = loss_and_grads(model, batch)

    handle = apply_sparselora(model, cfg, use_cache=False)
    result = loss_and_grads(model, batch)
    chosen = handle.last_selection()
    assert sorted(chosen) == list(range(LAYERS))
    # the last layer skips the FFN of every unread (sparse) position when that saving is on
    ffn_layers = range(LAYERS - 1) if cfg.skip_unread_last_layer else range(LAYERS)
    assert [i for i in chosen if "gate_proj" in chosen[i]] == list(ffn_layers)
    assert all(len(chosen[i]["gate_proj"]) == 48 for i in ffn_layers)  # half of 96
    assert all(len(chosen[i]["k_proj"]) == KV_HEADS * HEAD_DIM // 2 for i in (1, 2))
    handle.remove()

    hooks = install_masks(model, chosen, sparse_positions(batch["labels"]))
    expected = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    assert rel_err(expected[1], dense[1]) > REALLY_SPARSE
    for name, grad in expected[2].items():
        assert rel_err(grad, dense[2][name]) > REALLY_SPARSE, name
    return result, expected, dense, batch


def assert_grads_close(grads, ref_grads, tol):
    assert grads.keys() == ref_grads.keys()
    assert sum("lora_" in name for name in grads) == 2 * 7 * LAYERS  # A and B, 7 targets
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < tol, name


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_matches_masked_dense_reference(family, padding):
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads), _, _ = sparse_and_reference(
        family, padding, config(**CHANNELS_ONLY)
    )
    assert rel_err(loss, ref_loss) < SPARSE
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < SPARSE
    assert_grads_close(grads, ref_grads, SPARSE)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_savings_match_masked_dense_reference(family, padding):
    """Default config: labelled-logits head and the last layer's skipped context tokens."""
    cfg = config()
    assert cfg.labelled_logits and cfg.skip_unread_last_layer
    result, expected, _, batch = sparse_and_reference(family, padding, cfg)
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = result, expected
    assert rel_err(loss, ref_loss) < SPARSE
    read = ~sparse_positions(batch["labels"])
    assert logits.shape == (int(read.sum()), 97)  # only the positions the loss reads
    assert rel_err(logits, ref_logits[read]) < SPARSE
    assert_grads_close(grads, ref_grads, SPARSE)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remove_restores_bit_identical_outputs(family):
    model = lora_model(tiny_model(family), ATTN + MLP)
    batch = make_batch(padding="left")
    before = model(**batch).logits.detach()
    handle = apply_sparselora(model, config(**CHANNELS_ONLY), use_cache=False)
    assert not torch.equal(model(**batch).logits, before)
    handle.remove()
    assert torch.equal(model(**batch).logits.detach(), before)
