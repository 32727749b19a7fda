"""`sparselora eval` on LLM-Adapters-format evaluation files a user can audit: a predictions file
per evaluation (never overwritten), gold answers checked against the task before the model
loads, and a held-out loss that says what it scored."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sparselora.cli import app as cli
from sparselora.recipes import commands, evaluate
from sparselora.recipes.commands import evaluate_run
from sparselora.recipes.evaluate import is_correct
from sparselora.recipes.run_config import RunConfig
from tests.conftest import train_tiny_run

# Slices of LLM-Adapters' evaluation files (dataset/<name>/test.json), written by the tests: the
# instruction as LLM-Adapters writes it, its 'output' (a model-written answer) and the gold
# 'answer'; beside each row, a generation the fake model gives and whether it is correct.
FILES = {
    "gsm8k": [
        ("Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at "
         "$2 each. How much does she make?", "She sells 9 eggs, 9 * 2 = 18. The answer is 18.",
         "18", "9 eggs at $2 make 18 dollars.", True),
        ("A robe takes 2 bolts of blue fiber and half that much white. How many bolts in total?",
         "2 + 1 = 3 bolts.", "3", "2 + 1 = 3.5", False),
        ("Josh buys a house for $80,000 and puts in $50,000 in repairs; its value rises by "
         "150%. What is his profit?", "The profit is 70,000.", "70000", "a profit of $70,000",
         True),
    ],
    "svamp": [
        ("Each pack of dvds costs 76 dollars. There is a discount of 25 dollars on each pack. "
         "How much do you have to pay to buy each pack?", "76 - 25 = 51", "51.0", "51", True),
        ("Dan had $ 3 left with him after he bought a candy bar for $ 2. How much money did he "
         "have initially?", "3 + 2 = 5", "5.0", "he had 3 dollars", False),
    ],
    "aqua": [
        ("A car travels 110 km in 5 hours. What is its speed? Answer Choices: (A) 21 (B) 21.5 "
         "(C) 22 (D) 22.5 (E) 23", "110 / 5 = 22. The answer is C.", "C", "C) 22", True),
        ("What is 15% of 140? Answer Choices: (A) 19 (B) 20 (C) 21 (D) 22 (E) 23",
         "0.15 * 140 = 21, answer C", "C", "Answer: C", False),  # "Answer" starts with A
        ("Which is prime? Answer Choices: (A) 21 (B) 27 (C) 29 (D) 33 (E) 39",
         "29 is prime, C", "C", "the answer is d", False),  # lower case: no letter
    ],
    "boolq": [
        ("Please answer the following question with true or false, question: is the sun a "
         "star?\n\nAnswer format: true/false", "the correct answer is true", "true",
         "the correct answer is true", True),
        ("Please answer the following question with true or false, question: is ice hotter "
         "than steam?\n\nAnswer format: true/false", "the correct answer is false", "false",
         "True, it is", False),
    ],
    "arc-c": [
        ("Please choose the correct answer to the question: Which gas do plants take in?\n\n"
         "Answer1: oxygen Answer2: carbon dioxide Answer3: helium Answer4: neon\n\nAnswer "
         "format: answer1/answer2/answer3/answer4", "the correct answer is answer2", "answer2",
         "the correct answer is answer2", True),
        ("Please choose the correct answer to the question: What melts ice fastest?\n\n"
         "Answer1: salt Answer2: sand Answer3: sawdust Answer4: paper\n\nAnswer format: "
         "answer1/answer2/answer3/answer4", "the correct answer is answer1", "answer1",
         "answer4, not answer1", False),
    ],
}  # fmt: skip
ROW_FIELDS = ["index", "prompt", "generation", "extracted", "gold", "correct"]


def write_llm_adapters_file(path: Path, task: str) -> Path:
    rows = [
        {"instruction": instruction, "input": "", "output": output, "answer": answer}
        for instruction, output, answer, _, _ in FILES[task]
    ]
    path.write_text(json.dumps(rows, indent=2))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished run folder (2 steps) of a tiny local LLaMA on an LLM-Adapters math file."""
    root = tmp_path_factory.mktemp("trained")
    return train_tiny_run(root, 1, 16, "data.eval=null", "training.save_steps=0")


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    import shutil

    path = tmp_path / "run"
    shutil.copytree(trained_run, path)
    return path


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def fake_generations(monkeypatch, task: str) -> list:
    """Make generation return each row's known text; returns the prompts it was given."""
    seen = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress):
        seen.extend(prompts)
        return [row[3] for row in FILES[task]][: len(prompts)]

    monkeypatch.setattr(evaluate, "generate", generate)
    return seen


def test_eval_of_a_trained_run_writes_predictions_with_real_generation(run, tmp_path):
    data = write_llm_adapters_file(tmp_path / "test.json", "gsm8k")
    result = evaluate_run(run, data=str(data), task="gsm8k", max_new_tokens=4, batch_size=2)
    path = Path(result["predictions"])
    assert path == run / "predictions" / "gsm8k-test.jsonl"
    rows = read_rows(path)
    assert len(rows) == result["total"] == len(FILES["gsm8k"])
    for index, row in enumerate(rows):
        assert list(row) == ROW_FIELDS
        assert row["index"] == index and row["gold"] == FILES["gsm8k"][index][2]
        assert FILES["gsm8k"][index][0] in row["prompt"]  # the Alpaca prompt as the model saw it
        assert row["prompt"].rstrip().endswith("### Response:")
        assert row["correct"] == is_correct("gsm8k", row["generation"], row["gold"])
        assert row["extracted"] == evaluate.extract_answer("gsm8k", row["generation"])
    assert result["correct"] == sum(row["correct"] for row in rows)
    assert (
        result["heldout_loss"] > 0
        and "'output' is a model-written answer" in (result["heldout_loss_note"])
    )
    assert json.loads((run / "eval.json").read_text()) == result


@pytest.mark.parametrize("task", list(FILES))
def test_predictions_record_extracted_gold_and_correct(run, tmp_path, monkeypatch, task):
    seen = fake_generations(monkeypatch, task)
    data = write_llm_adapters_file(tmp_path / "test.json", task)
    result = evaluate_run(run, data=str(data), task=task, loss=False)
    assert "heldout_loss" not in result  # --no-loss
    rows = read_rows(result["predictions"])
    expected = [row[4] for row in FILES[task]]
    assert [row["correct"] for row in rows] == expected
    assert [row["generation"] for row in rows] == [row[3] for row in FILES[task]]
    for row in rows:
        assert row["correct"] == is_correct(task, row["generation"], row["gold"])
    assert result["correct"] == sum(expected) and result["total"] == len(expected)
    assert len(seen) == len(expected)
    assert Path(result["predictions"]).name == f"{evaluate.canonical_task(task)}-test.jsonl"


def test_aqua_predictions_show_the_extracted_letter(run, tmp_path, monkeypatch):
    fake_generations(monkeypatch, "aqua")
    data = write_llm_adapters_file(tmp_path / "test.json", "aqua")
    result = evaluate_run(run, data=str(data), task="aqua")
    rows = read_rows(result["predictions"])
    assert [row["extracted"] for row in rows] == ["C", "A", None]
    # Every prompt fills data.max_length=64: no response token to score, yet accuracy runs.
    assert result["heldout_loss"] is None
    assert result["heldout_loss_note"].startswith("not computed: no training example left")
    assert "Answer Choices: (A) 21 (B) 21.5" in rows[0]["prompt"]


def test_a_second_eval_writes_a_new_predictions_file(run, tmp_path, monkeypatch):
    fake_generations(monkeypatch, "boolq")
    data = write_llm_adapters_file(tmp_path / "test.json", "boolq")
    first = evaluate_run(run, data=str(data), task="boolq", loss=False)
    before = Path(first["predictions"]).read_bytes()
    second = evaluate_run(run, data=str(data), task="boolq", loss=False)
    assert Path(second["predictions"]).name == "boolq-test-2.jsonl"
    assert Path(first["predictions"]).read_bytes() == before  # untouched
    third = evaluate_run(run, data=str(data), task="boolq", limit=1, loss=False)
    assert Path(third["predictions"]).name == "boolq-test-3.jsonl"
    assert len(read_rows(third["predictions"])) == 1
    assert json.loads((run / "eval.json").read_text()) == third  # eval.json: the latest
    history = read_rows(run / "eval_history.jsonl")  # every evaluation, in order
    assert [h["predictions"] for h in history] == [r["predictions"] for r in (first, second, third)]


@pytest.mark.parametrize(
    "task,data_task,index,value,form",
    [
        ("gsm8k", "aqua", 0, "'C'", "a number"),
        ("aqua", "svamp", 0, "'51.0'", "one letter A-E"),
        ("boolq", "arc-c", 0, "'answer2'", "true or false"),
        ("arc-c", "boolq", 0, "'true'", "answer1 .. answer5"),
    ],
)
def test_golds_of_the_wrong_form_fail_before_the_model_loads(
    run, tmp_path, monkeypatch, task, data_task, index, value, form
):
    monkeypatch.setattr(commands, "load_run", lambda run_dir: pytest.fail("model loaded"))
    data = write_llm_adapters_file(tmp_path / "test.json", data_task)
    with pytest.raises(ValueError) as error:
        evaluate_run(run, data=str(data), task=task)
    message = str(error.value)
    task_name = evaluate.canonical_task(task)
    assert f"task {task_name}" in message and f"example {index}" in message
    assert value in message and form in message
    assert not (run / "predictions").exists()


def test_cli_eval_prints_where_it_wrote(run, tmp_path, monkeypatch, capsys):
    fake_generations(monkeypatch, "gsm8k")
    data = write_llm_adapters_file(tmp_path / "test.json", "gsm8k")
    assert cli.main(["eval", str(run), "--data", str(data), "--task", "GSM8K"]) == 0
    out = capsys.readouterr().out
    path = run / "predictions" / "gsm8k-test.jsonl"
    assert f"predictions written to {path}" in out
    assert "heldout_loss_note" in out and "model-written answer" in out
    assert f"result written to {run / 'eval.json'}" in out
    assert cli.main(["eval", str(run), "--data", str(data), "--task", "aqua"]) == 2
    assert "task AQuA" in capsys.readouterr().err


def test_train_warns_when_eval_stays_on_the_default_gsm8k(trained_run, tmp_path, caplog):
    import sparselora.recipes.train as train_module

    own = tmp_path / "math_10k.json"  # missing: train stops at the data, after the warning
    config = RunConfig.load(
        None,
        [f"model.name={trained_run.parent / 'tiny'}", f"data.train={own}",
         f"training.output_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="does not exist"):
        train_module.train(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"data.train is {own}" in warnings[0] and "gsm8k:eval" in warnings[0]
    assert "data.task=gsm8k" in warnings[0]
    caplog.clear()
    for overrides in (
        [],
        [f"data.train={own}", f"data.eval={own}"],
        [f"data.train={own}", "data.eval=null"],
    ):
        assert RunConfig.load(None, overrides).default_eval_warning() is None
