"""The real embedded model: SmolLM2-135M-Instruct (LLaMA, 30 layers, GQA 9/3 heads)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.recipes.assets import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2():
    return load_smollm2()


def test_wrapping_leaves_dense_generation_unchanged_and_a_sparse_step_trains(smollm2, tmp_path):
    model, tokenizer = smollm2
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 plus 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    peft_model.eval()
    expected = peft_model.generate(**prompt, max_new_tokens=8, do_sample=False)

    config = SparseLoRAConfig(
        ffn_sparsity={"4-28": 0.5}, attn_sparsity={"10-28": 0.5}, estimator="svd", start_step=0.0
    )
    handle = apply_sparselora(peft_model, config, cache_dir=tmp_path)
    assert torch.equal(peft_model.generate(**prompt, max_new_tokens=8, do_sample=False), expected)

    text = "Question: Tom has 3 apples and buys 4 more. How many now?\nAnswer: 7"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :-3] = -100  # loss on the answer tokens only
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    chosen = handle.last_selection()
    assert sorted(chosen) == list(range(4, 29))
    assert len(chosen[4]["gate_proj"]) == 768 and len(chosen[10]["k_proj"]) == 96
    lora_b_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b_grads) == 120 and all(g is not None for g in lora_b_grads)
    # LoRA B starts at zero, so its gradient is the one that must be nonzero in every layer,
    # including layer 0, which the gradient reaches only through the sparse layers above it.
    assert all(g.abs().sum() > 0 for g in lora_b_grads)


def test_a_few_sparse_steps_reduce_the_training_loss(smollm2):
    model, tokenizer = smollm2
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    handle = apply_sparselora(
        peft_model,
        SparseLoRAConfig(
            ffn_sparsity={"2-28": 0.5}, attn_sparsity={"10-28": 0.5}, calibration_tokens=1
        ),
        calibration=[
            tokenizer(
                ["Natalia sold clips to 48 of her friends in April."], return_tensors="pt"
            ).data
        ],
        use_cache=False,
    )
    text = ["Q: Tom has 3 apples and buys 4 more. How many now? A: 3 + 4 = 7. The answer is 7."] * 2
    batch = tokenizer(text, return_tensors="pt").data
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :14] = -100
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert handle.last_selection()  # the steps ran sparse
    assert losses[-1] < 0.8 * losses[0], losses
