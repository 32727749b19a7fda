"""DoRA adapters (`LoraConfig(use_dora=True)`) under SparseLoRA, fp32.

The masked-dense reference is PEFT's own DoRA forward with the frozen projections masked by
`install_masks`: the weight norm ||W + scaling B A|| is PEFT's, on the whole weight. One
adjustment: PEFT takes the frozen output as `result - bias`; where a masked row's bias was
zeroed that would give -bias, so for rows masked with a bias the hook below hands PEFT the
masked output plus the whole bias, making its frozen output the masked x W^T (docs/METHOD.md,
section 6, "DoRA").

Tolerances (relative L2): sparsity near 0 / disabled vs plain PEFT DoRA: 1e-6 (loss and logits
come out bit-identical; with the test's large random biases the backward's summation order alone
moves layer 1's q/k gradients by ~6e-6, plain LoRA too, so that case takes 1e-5); sparse vs the
masked-dense reference: 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, MLP, make_batch, sparse_config, tiny_llama
from peft import LoraConfig, get_peft_model
from reference import assert_close as assert_grads_close
from reference import install_masks, loss_and_grads, rel_err

from sparselora import apply_sparselora

EXACT = 1e-6
SPARSE = 1e-5
MAGNITUDE = "lora_magnitude_vector"


def dora_model(model, targets=ATTN, seed: int = 1, **lora):
    """PEFT DoRA with non-zero B and a magnitude away from the weight norm, so both matter."""
    fields = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_dora=True)
    config = LoraConfig(**{**fields, **lora})
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
        elif MAGNITUDE in name:
            param.data.mul_(1 + 0.3 * torch.randn_like(param))
    return peft_model


def assert_close(result, expected, tol):
    """As reference.assert_close, and the DoRA magnitudes are among the gradients compared."""
    assert any(MAGNITUDE in name for name in result[2])
    assert_grads_close(result, expected, tol)


def sparse_tokens_of(batch) -> torch.Tensor:
    """(B, L) the positions that run sparse: those that do not predict a labelled token."""
    labelled = batch["labels"] != -100
    sparse = torch.ones_like(labelled)
    sparse[:, :-1] = ~labelled[:, 1:]
    return sparse


def whole_bias_hooks(peft_model, selection, sparse_tokens, sparse_lora_branch=False):
    """For rows masked under the PEFT layer (q/k/v, and gate/up without `sparse_lora_branch`)
    whose base layer has a bias: hand DoRA `masked output + whole bias` as its base result, so
    that PEFT's `base_result - bias` is the masked x W^T rather than -bias at dropped rows."""
    layers = peft_model.get_base_model().model.layers
    dense = (~sparse_tokens).float().unsqueeze(-1)  # (B, L, 1)
    hooks = []

    def add_dropped_bias(mask, bias):
        def hook(module, args, kwargs):
            kwargs["base_result"] = kwargs["base_result"] + (1 - mask) * bias
            return args, kwargs

        return hook

    for index, chosen in selection.items():
        names = ("q_proj", "k_proj", "v_proj") if "q_proj" in chosen else ()
        if "gate_proj" in chosen and not sparse_lora_branch:
            names += ("gate_proj", "up_proj")
        for name in names:
            parent = "mlp" if name in MLP else "self_attn"
            module = layers[index].get_submodule(f"{parent}.{name}")
            if not hasattr(module, "lora_magnitude_vector") or module.base_layer.bias is None:
                continue
            bias = module.base_layer.bias
            kept = torch.zeros(bias.numel())
            kept[chosen[name]] = 1.0
            mask = dense + (1 - dense) * kept  # (B, L, out)
            dora = module.lora_magnitude_vector["default"]
            hook = add_dropped_bias(mask, bias.detach())
            hooks.append(dora.register_forward_pre_hook(hook, with_kwargs=True))
    return hooks


@pytest.mark.parametrize("bias", [False, True])
def test_near_zero_sparsity_matches_peft(bias):
    """Every channel kept: the sparse code path reproduces PEFT's DoRA."""
    model = dora_model(tiny_llama(kv_heads=2, bias=bias), ATTN + MLP)
    batch = make_batch(padding="right")
    expected = loss_and_grads(model, batch)
    cfg = sparse_config(ffn_sparsity=1e-9, attn_sparsity=1e-9)
    handle = apply_sparselora(model, cfg, use_cache=False)
    result = loss_and_grads(model, batch)
    assert len(handle.last_selection()) == 3  # the sparse path really ran
    assert_close(result, expected, SPARSE if bias else EXACT)


def test_disabled_dense_and_removed_match_peft():
    model = dora_model(tiny_llama(), ATTN + MLP)
    batch = make_batch()
    expected = loss_and_grads(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = sparse_config(ffn_sparsity=0.75, attn_sparsity=0.75)
    handle = apply_sparselora(model, cfg, use_cache=False)
    assert rel_err(loss_and_grads(model, batch)[0], expected[0]) > 1e-4  # sparse differs
    handle.disable()
    assert_close(loss_and_grads(model, batch), expected, EXACT)
    handle.enable()
    with handle.dense():
        assert_close(loss_and_grads(model, batch), expected, EXACT)
    handle.remove()
    loss, logits, grads = loss_and_grads(model, batch)
    assert torch.equal(loss, expected[0]) and torch.equal(logits, expected[1])
    assert all(torch.equal(grads[name], expected[2][name]) for name in grads)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


CASES = {
    "mha-attn": dict(kv_heads=4, targets=ATTN),
    "gqa-attn": dict(kv_heads=2, targets=ATTN),
    "gqa-attn-mlp": dict(kv_heads=2, targets=ATTN + MLP),
    "gqa-mlp-only": dict(kv_heads=2, targets=MLP),
    "mqa-attn-mlp-sparse-branch": dict(kv_heads=1, targets=ATTN + MLP, sparse_lora_branch=True),
    "gqa-bias": dict(kv_heads=2, targets=ATTN + MLP, bias=True),
    "gqa-bias-sparse-branch": dict(
        kv_heads=2, targets=ATTN + MLP, bias=True, sparse_lora_branch=True
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_matches_masked_dense_reference(case):
    spec = dict(CASES[case])
    targets = spec.pop("targets")
    model_kwargs = {k: spec.pop(k) for k in ("kv_heads", "bias") if k in spec}
    model = dora_model(tiny_llama(**model_kwargs), targets)
    batch = make_batch(padding="left" if model_kwargs["kv_heads"] == 2 else "right")
    dense = loss_and_grads(model, batch)

    cfg = sparse_config(**spec)
    handle = apply_sparselora(model, cfg, use_cache=False)
    result = loss_and_grads(model, batch)
    chosen = handle.last_selection()
    assert sorted(chosen) == [0, 1, 2]
    handle.remove()

    sparse_tokens = sparse_tokens_of(batch)
    hooks = install_masks(model, chosen, sparse_tokens, cfg.sparse_lora_branch)
    hooks += whole_bias_hooks(model, chosen, sparse_tokens, cfg.sparse_lora_branch)
    expected = loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    assert rel_err(expected[1], dense[1]) > 1e-4  # the reference is really sparse
    assert_close(result, expected, SPARSE)


def test_norm_of_kept_rows_is_the_whole_weights():
    """The per-row weight norm on kept rows equals PEFT's on the whole weight, and a norm of
    the input columns an input-sparse projection keeps would not: the reference needs it."""
    from sparselora.engine.peft_compat import dora_weight_norm

    model = dora_model(tiny_llama(), ATTN)
    q = model.get_base_model().model.layers[1].self_attn.q_proj
    o = model.get_base_model().model.layers[1].self_attn.o_proj
    layer = q.lora_magnitude_vector["default"]
    lora_weight = layer.get_lora_weight(q.lora_A["default"], q.lora_B["default"])
    peft_norm = layer.get_weight_norm(q.base_layer.weight, lora_weight, q.scaling["default"])
    rows = torch.tensor([0, 5, 17, 31])
    ours = dora_weight_norm(q, "default", rows, torch.float32)
    assert rel_err(ours, peft_norm[rows]) < EXACT
    assert rel_err(dora_weight_norm(q, "default", None, torch.float32), peft_norm) < EXACT
    # o keeps input columns: the norm of its kept columns alone is a different (wrong) scale.
    full = dora_weight_norm(o, "default", None, torch.float32)
    cols = torch.arange(0, 64, 2)
    sliced = o.base_layer.weight + 2 * o.lora_B["default"].weight @ o.lora_A["default"].weight
    assert rel_err(sliced[:, cols].norm(dim=1), full) > 0.1


def test_dora_with_dropout_is_refused():
    model = dora_model(tiny_llama(), ATTN, lora_dropout=0.1)
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        apply_sparselora(model, sparse_config(), use_cache=False)


def test_dora_with_another_active_adapter_is_refused():
    model = dora_model(tiny_llama(), ATTN)
    model.add_adapter("plain", LoraConfig(r=2, target_modules=ATTN))
    model.base_model.set_adapter(["default", "plain"])
    with pytest.raises(NotImplementedError, match="single active adapter"):
        apply_sparselora(model, sparse_config(), use_cache=False)


def test_other_lora_variants_are_still_refused():
    config = LoraConfig(
        r=2, target_modules=ATTN, alora_invocation_tokens=[5], task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_llama(), config)
    with pytest.raises(NotImplementedError, match="ALoraLinearVariant"):
        apply_sparselora(model, sparse_config(), use_cache=False)
