"""The public handle: reversibility, PEFT interoperability, eval/generation, errors, schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, CHANNELS_ONLY, MLP, lora_model, make_batch, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from sparselora import (
    ConfigError,
    SparseLoRACallback,
    SparseLoRAConfig,
    SparseSchedule,
    apply_sparselora,
)

SPARSE = SparseLoRAConfig(
    ffn_sparsity=0.75,
    attn_sparsity=0.5,
    estimator="svd",
    start_step=0.0,
    ffn_criterion="per_token",
    **CHANNELS_ONLY,
)


def test_remove_restores_bit_identical_outputs_and_state_dict():
    model = lora_model(tiny_llama(), ATTN + MLP)
    batch = make_batch(padding="left")
    before = model(**batch).logits.detach()
    keys_before = list(model.state_dict())
    handle = apply_sparselora(model, SPARSE, use_cache=False)
    assert list(model.state_dict()) == keys_before  # no renamed or copied parameters
    assert not torch.equal(model(**batch).logits, before)
    handle.remove()
    assert torch.equal(model(**batch).logits.detach(), before)
    layer = model.get_base_model().model.layers[0]
    assert "forward" not in layer.mlp.__dict__ and "forward" not in layer.self_attn.q_proj.__dict__


def test_parameters_are_shared_not_copied():
    model = lora_model(tiny_llama(), ATTN)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    apply_sparselora(model, SPARSE, use_cache=False)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    model = lora_model(tiny_llama(), ATTN + MLP)
    handle = apply_sparselora(model, SPARSE, use_cache=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = make_batch()
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()  # eval is dense
    expected = model(**batch).logits.detach()
    model.save_pretrained(tmp_path / "adapter")
    handle.remove()
    fresh = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(fresh(**batch).logits, expected, rtol=1e-6, atol=1e-6)


def test_eval_and_generation_are_dense_by_default():
    model = lora_model(tiny_llama(), ATTN + MLP).eval()
    batch = make_batch()
    prompt = batch["input_ids"][:1, :6]
    expected_logits = model(**batch).logits
    expected_tokens = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    handle = apply_sparselora(model, SPARSE, use_cache=False)
    assert torch.equal(model(**batch).logits, expected_logits)
    tokens = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, expected_tokens)
    model.train()
    assert not torch.equal(model(**batch).logits, expected_logits)  # training is sparse
    handle.config.sparse_in_eval = True
    model.eval()
    assert not torch.equal(model(**batch).logits, expected_logits)


def test_no_labels_means_dense_unless_configured():
    model = lora_model(tiny_llama(), ATTN)
    batch = make_batch()
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    expected = model(**unlabelled).logits
    handle = apply_sparselora(model, SPARSE, use_cache=False)
    assert torch.equal(model(**unlabelled).logits, expected)
    handle.config.sparse_without_labels = True
    assert not torch.equal(model(**unlabelled).logits, expected)


def test_unsupported_model_type_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = get_peft_model(
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    with pytest.raises(NotImplementedError, match="'gpt2'.*llama"):
        apply_sparselora(model, SPARSE, use_cache=False)


def test_layer_beyond_model_depth_is_a_clear_error():
    model = lora_model(tiny_llama(layers=3), ATTN)
    with pytest.raises(ConfigError, match="layer 3.*3 layers"):
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"1-3": 0.5}), use_cache=False)
    with pytest.raises(ConfigError, match="layer 17.*another model"):
        apply_sparselora(model, SparseLoRAConfig.from_preset("llama3-8b-csr"), use_cache=False)


def test_schedule_fractions():
    schedule = SparseSchedule(100, start_step=0.05, end_step=0.9)
    sparse = [step for step in range(100) if schedule.is_sparse(step)]
    assert sparse[0] == 5 and sparse[-1] == 89 and len(sparse) == 85
    with pytest.raises(ValueError, match="total_steps"):
        SparseSchedule(0)


def test_trainer_callback_follows_the_schedule(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lora_model(tiny_llama(), ATTN)
    config = SparseLoRAConfig(ffn_sparsity=0.5, estimator="svd", start_step=0.5)
    handle = apply_sparselora(model, config, use_cache=False)
    seen = []

    class Record(SparseLoRACallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(
                (state.global_step, self.handle.enabled, bool(self.handle.last_selection()))
            )

    batch = make_batch(batch=2, length=10)
    data = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 4
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Record(handle)]).train()
    assert seen == [(1, False, False), (2, False, False), (3, True, True), (4, True, True)]


def test_merged_adapters_run_dense_instead_of_adding_the_delta_twice():
    model = lora_model(tiny_llama(), ATTN + MLP)
    batch = make_batch()
    model.merge_adapter()
    expected = model(**batch).logits.detach()
    apply_sparselora(model, SPARSE, use_cache=False)
    torch.testing.assert_close(model(**batch).logits, expected)
