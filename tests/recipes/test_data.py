"""Tests for data loading, prompt formatting, response-only labels and the padding collator."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoTokenizer

from sparselora.config import IGNORE_INDEX
from sparselora.recipes.assets import gsm8k_split, smollm2_path
from sparselora.recipes.data import Collator, format_prompt, tokenize_records
from sparselora.recipes.records import DataError, Record, load_records


@pytest.fixture(scope="module")
def tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (ChatML template, eos = pad = <|im_end|> = 2)."""
    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def alpaca(instruction: str, output: str, context: str = "", answer: str | None = None) -> Record:
    return Record(kind="alpaca", prompt=instruction, input=context, response=output, answer=answer)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special).input_ids


# --- loading ---------------------------------------------------------------------------------


def test_llm_adapters_json_loads_as_alpaca_records(tmp_path):
    path = tmp_path / "math_10k.json"
    rows = [
        {
            "instruction": "What is 2+3?",
            "input": "",
            "output": "2+3=5. The answer is 5",
            "answer": "5",
        },
        {"instruction": "Add them.", "input": "4 and 7", "output": "11", "answer": 11},
    ]
    path.write_text(json.dumps(rows, indent=2))
    records = load_records(path)
    assert records == [
        alpaca("What is 2+3?", "2+3=5. The answer is 5", answer="5"),
        alpaca("Add them.", "11", context="4 and 7", answer="11"),
    ]


def test_jsonl_loads_all_three_row_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    write_jsonl(
        path,
        [
            {"instruction": "Say yes.", "output": "yes"},
            {"prompt": "The sky is", "completion": " blue.", "answer": "blue"},
            {"messages": messages},
        ],
    )
    path.write_text(path.read_text() + "\n  \n")  # trailing blank lines are ignored
    records = load_records(str(path))
    assert records == [
        alpaca("Say yes.", "yes"),
        Record(kind="completion", prompt="The sky is", input="", response=" blue.", answer="blue"),
        Record(kind="chat", prompt=messages[:-1], input="", response="Blue.", answer=None),
    ]


def test_gsm8k_source_gives_the_embedded_split():
    train, held_out = gsm8k_split()
    records = load_records("gsm8k")
    assert len(records) == 1119 and len(load_records("gsm8k:eval")) == 200
    assert load_records("gsm8k:train") == records
    first = records[0]
    assert first["kind"] == "chat"
    assert first["prompt"] == [{"role": "user", "content": train[0]["question"]}]
    assert first["response"] == train[0]["answer"]
    assert first["answer"] == train[0]["final_answer"]
    assert load_records("gsm8k:eval")[-1]["answer"] == held_out[-1]["final_answer"]
    with pytest.raises(DataError, match="unknown data source 'gsm8k:test'"):
        load_records("gsm8k:test")


def test_a_file_named_like_gsm8k_is_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "gsm8k_mine.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    assert [r["response"] for r in load_records("gsm8k_mine.jsonl")] == ["2"]


def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"data file {path} does not exist")):
        load_records(path)


def test_malformed_jsonl_reports_the_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3: not valid JSON")):
        load_records(path)


def test_malformed_json_list_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",, }\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: not valid JSON")) as err:
        load_records(path)
    assert "line 3, column 23" in str(err.value)


def test_non_utf8_file_is_a_clear_error_naming_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{path}, line 1, column 16: not UTF-8 text")):
        load_records(path)


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = tmp_path / "windows.jsonl"
    rows = ['{"prompt": "a", "completion": "b"}', '{"prompt": "c\u2028d", "completion": "e"}']
    path.write_bytes("\ufeff".encode() + "\r\n".join(rows).encode())
    assert [r["prompt"] for r in load_records(path)] == ["a", "c\u2028d"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "x", "input": ""}, "missing field(s) 'output'"),
        ({"completion": "x"}, "missing field(s) 'prompt'"),
        ({"question": "x", "solution": "y"}, "no known fields (has ['question', 'solution'])"),
        ({"instruction": 3, "output": "y"}, "'instruction' must be a string"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "'messages' must be a list of at least two",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "the last message must be the assistant reply",
        ),
        ({"messages": [{"role": "bot", "content": "x"}] * 2}, "messages[0] has role 'bot'"),
    ],
)
def test_row_without_needed_fields_names_row_and_problem(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: {message}")) as err:
        load_records(path)
    if "field" in message:
        assert "allowed row formats: instruction/output" in str(err.value)


def test_bad_row_in_json_list_names_its_index(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=re.escape(f"{path}, index 1: missing field(s) 'output'")):
        load_records(path)


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_dataset_is_an_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path}: no records (empty dataset)")):
        load_records(path)


# --- prompt formatting -----------------------------------------------------------------------


def test_alpaca_prompt_text_is_exact():
    assert format_prompt(alpaca("Add 2 and 3.", "5")) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert format_prompt(alpaca("Add them.", "5", context="2 and 3")) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd them.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_chat_records_use_the_tokenizer_chat_template(tokenizer):
    record = load_records("gsm8k:eval")[0]
    text = format_prompt(record, tokenizer)
    question = record["prompt"][0]["content"]
    assert text.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its system prompt


def test_auto_formats_chat_records_as_alpaca_for_a_base_model_tokenizer(tokenizer):
    """A base model's tokenizer has no chat template: auto falls back to the Alpaca prompt."""
    import copy

    record = load_records("gsm8k:eval")[0]
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    question = record["prompt"][0]["content"]
    assert format_prompt(record, base) == format_prompt(record, base, template="alpaca")
    assert format_prompt(record, base).endswith(f"### Instruction:\n{question}\n\n### Response:\n")
    examples, _ = tokenize_records([record], base)
    prompt = base(format_prompt(record, base))["input_ids"]
    assert examples[0]["prompt_ids"] == prompt  # plain text: the tokenizer's own special tokens
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(record, base, template="chat")  # asked for explicitly: still an error


def test_template_override(tokenizer):
    record = alpaca("Add them.", "5", context="2 and 3")
    as_chat = format_prompt(record, tokenizer, template="chat")
    assert as_chat.endswith(
        "<|im_start|>user\nAdd them.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(record, template="raw") == "Add them.\n\n2 and 3"

    completion = Record(kind="completion", prompt="Q: 1+1?", input="", response=" 2", answer=None)
    assert format_prompt(completion) == "Q: 1+1?"
    assert format_prompt(completion, template="alpaca").endswith(
        "### Instruction:\nQ: 1+1?\n\n### Response:\n"
    )

    single = Record(
        kind="chat",
        prompt=[{"role": "user", "content": "Hi"}],
        input="",
        response="Yo",
        answer=None,
    )
    assert format_prompt(single, template="alpaca").endswith(
        "### Instruction:\nHi\n\n### Response:\n"
    )
    multi = Record(
        kind="chat",
        prompt=[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
        input="",
        response="Yo",
        answer=None,
    )
    with pytest.raises(ValueError, match="single user message"):
        format_prompt(multi, template="raw")
    with pytest.raises(ValueError, match="template must be one of"):
        format_prompt(record, template="llama")


# --- tokenisation ----------------------------------------------------------------------------


def test_labels_mask_the_prompt_and_keep_response_and_eos(tokenizer):
    record = alpaca("What is 6 times 7?", "6 times 7 is 42.", answer="42")
    (example,), stats = tokenize_records([record], tokenizer)
    prompt_ids = encode(tokenizer, format_prompt(record))
    response_ids = encode(tokenizer, "6 times 7 is 42.", special=False)
    assert example["prompt_ids"] == prompt_ids
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [2]
    assert example["answer"] == "42"
    labelled = [
        t
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(labelled) == "6 times 7 is 42.<|im_end|>"
    assert (stats.examples, stats.skipped_no_response, stats.prompts_truncated) == (1, 0, 0)
    assert stats.response_tokens == len(response_ids) + 1
    assert stats.tokens == stats.longest == len(example["input_ids"])


def test_chat_example_prompt_ids_match_generation_prompt(tokenizer):
    record = load_records("gsm8k:eval")[0]
    (example,), _ = tokenize_records([record], tokenizer)
    generation_ids = tokenizer.apply_chat_template(
        record["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert example["prompt_ids"] == generation_ids
    labelled = example["input_ids"][len(generation_ids) :]
    assert example["labels"][len(generation_ids) :] == labelled
    assert tokenizer.decode(labelled) == record["response"] + "<|im_end|>"
    assert set(example["labels"][: len(generation_ids)]) == {IGNORE_INDEX}


def test_bos_is_added_once_to_text_prompts_and_never_twice_to_chat_prompts():
    bos_tokenizer = AutoTokenizer.from_pretrained(
        smollm2_path(), local_files_only=True, add_bos_token=True
    )  # BOS = <|im_start|> = 1, as Llama-style tokenizers prepend theirs
    text_record = alpaca("Say hi.", "hi")
    chat_record = Record(
        kind="chat",
        prompt=[{"role": "user", "content": "Hi"}],
        input="",
        response="hi",
        answer=None,
    )
    (text, chat), _ = tokenize_records([text_record, chat_record], bos_tokenizer)
    hi = encode(bos_tokenizer, "hi", special=False)
    assert text["prompt_ids"][:2] == [1, encode(bos_tokenizer, "Below", special=False)[0]]
    assert text["input_ids"] == text["prompt_ids"] + hi + [2]  # no BOS before the response
    assert chat["prompt_ids"][:2] == [1, encode(bos_tokenizer, "system", special=False)[0]]
    assert chat["input_ids"] == chat["prompt_ids"] + hi + [2]


def test_long_prompt_keeps_its_last_prompt_max_length_tokens(tokenizer):
    record = alpaca("Repeat: " + "apple banana " * 60, "Done.")
    full_prompt = encode(tokenizer, format_prompt(record))
    assert len(full_prompt) > 100
    (example,), stats = tokenize_records([record], tokenizer, prompt_max_length=32)
    assert example["prompt_ids"] == full_prompt[-32:]
    assert tokenizer.decode(example["prompt_ids"]).endswith("### Response:\n")
    assert example["labels"][:32] == [IGNORE_INDEX] * 32
    assert example["input_ids"][32:] == encode(tokenizer, "Done.", special=False) + [2]
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 0


def test_sequence_is_cut_at_max_length_and_eos_only_if_it_fits(tokenizer):
    response = "one two three four five six seven eight nine ten"
    record = alpaca("Count.", response)
    prompt_len = len(encode(tokenizer, format_prompt(record)))
    response_ids = encode(tokenizer, response, special=False)

    (cut,), stats = tokenize_records([record], tokenizer, max_length=prompt_len + 4)
    assert cut["input_ids"][prompt_len:] == response_ids[:4]  # no EOS after a cut response
    assert cut["labels"][prompt_len:] == response_ids[:4]
    assert stats.responses_truncated == 1

    exact = prompt_len + len(response_ids)  # the response fits, its EOS does not
    (no_eos,), _ = tokenize_records([record], tokenizer, max_length=exact)
    assert no_eos["input_ids"][-1] == response_ids[-1] and len(no_eos["input_ids"]) == exact

    (whole,), stats = tokenize_records([record], tokenizer, max_length=exact + 1)
    assert whole["input_ids"][-1] == 2 and stats.responses_truncated == 0


def test_examples_without_response_tokens_are_skipped_and_counted(tokenizer, caplog):
    long_prompt = alpaca("Explain: " + "word " * 100, "ok")
    empty_response = alpaca("Say nothing.", "")
    good = alpaca("Say hi.", "hi", answer="hi")
    examples, stats = tokenize_records(
        [long_prompt, empty_response, good], tokenizer, max_length=64, prompt_max_length=64
    )
    assert [e["answer"] for e in examples] == ["hi"]
    assert (stats.records, stats.examples, stats.skipped_no_response) == (3, 1, 2)
    assert "Skipped 2 of 3 examples" in caplog.text and "[0, 1]" in caplog.text

    with pytest.raises(ValueError, match="no training example left: all 2 records"):
        tokenize_records(
            [long_prompt, empty_response], tokenizer, max_length=64, prompt_max_length=64
        )


def test_tokenize_rejects_bad_arguments(tokenizer):
    record = alpaca("a", "b")
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenize_records([record], tokenizer, max_length=1)
    with pytest.raises(ValueError, match="template must be one of"):
        tokenize_records([record], tokenizer, template="alpaka")


# --- collator --------------------------------------------------------------------------------


FEATURES = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "answer": "x"},
    {"input_ids": [9, 10], "labels": [-100, 10]},
]


def test_collator_pads_right():
    batch = Collator(pad_token_id=2)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_collator_pads_left_and_to_a_multiple():
    batch = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=3)(FEATURES)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8], [0, 0, 0, 0, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 7, 8], [-100] * 5 + [10]]


def test_collator_makes_prompt_batches_without_labels():
    batch = Collator(pad_token_id=2, padding_side="left")(
        [{"input_ids": [4]}, {"input_ids": [5, 6]}]
    )
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[2, 4], [5, 6]]
    with pytest.raises(ValueError, match="either every feature"):
        Collator(2)([FEATURES[0], {"input_ids": [1]}])
    with pytest.raises(ValueError, match="padding_side must be"):
        Collator(2, padding_side="middle")


def test_left_and_right_padding_give_the_same_loss():
    """The masks are right: padded rows give the loss their tokens give alone, either side."""
    model = tiny_llama().eval()
    generator = torch.Generator().manual_seed(0)
    features, labelled = [], []
    for length, prompt in ((11, 4), (6, 3), (9, 5)):
        ids = torch.randint(3, 97, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
        labelled.append(length - prompt)  # tokens the shifted loss scores
    with torch.no_grad():
        right = model(**Collator(0, "right")(features)).loss
        left = model(**Collator(0, "left")(features)).loss
        row_sums = [
            model(**Collator(0)([f])).loss * n for f, n in zip(features, labelled, strict=True)
        ]
    alone = sum(row_sums) / sum(labelled)
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)
