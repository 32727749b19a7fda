"""Training data: load records, format prompts, tokenise with response-only labels, pad batches.

The pipeline is three plain steps, each usable on its own::

    records = load_records("math_10k.json")             # list of Record dicts
    examples, stats = tokenize_records(records, tokenizer, max_length=512)
    batch = Collator(tokenizer.pad_token_id)(examples[:8])  # input_ids, attention_mask, labels

Sources ``load_records`` understands:

- ``"gsm8k"``, ``"gsm8k:train"``, ``"gsm8k:eval"``: the embedded GSM8K split of
  ``sparselora.recipes.assets.gsm8k_split`` (1,119 train / 200 held-out problems with the defaults). The
  question is a user chat message, the response the worked solution ending in ``#### N``, the gold
  answer ``N``.
- an LLM-Adapters JSON file (``math_10k.json``, ``commonsense_170k.json``): a JSON list of
  ``{"instruction", "input", "output", "answer"}`` objects, formatted with the Alpaca prompt.
- a JSONL file, one object a line, in any of the three row formats below (a JSON list of such
  rows works too).

Row formats and the internal ``Record`` each becomes:

============================  ==========  ==========================================
row fields                    ``kind``    prompt side
============================  ==========  ==========================================
instruction, [input], output  alpaca      ``prompt`` = instruction, ``input`` = input
prompt, completion            completion  ``prompt`` = the prompt text, used verbatim
messages (role/content list)  chat        ``prompt`` = the messages before the last
                                          (assistant) message, which is the response
============================  ==========  ==========================================

Any row may carry an ``answer`` (the gold answer used by generation-based evaluation).

Tokenisation follows the paper (docs/METHOD.md, section 12 'Data and evaluation'): loss on the
response only, EOS appended, prompts cut at 256 tokens, sequences at 512. The prompt and the response are tokenised separately
and concatenated, so the prompt ids a model sees in training are exactly the ids it is given at
generation time (``Example["prompt_ids"]``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from sparselora.config import IGNORE_INDEX
from sparselora.recipes.assets import gsm8k_split

logger = logging.getLogger(__name__)


# The Alpaca prompt of Stanford Alpaca, which LLM-Adapters uses for math_10k / commonsense_170k.
# LLM-Adapters writes it inside an indented triple-quoted f-string, so its literal training text
# also carries the source's indentation and trailing spaces; we use the clean wording.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TEMPLATES = ("auto", "alpaca", "chat", "raw")
GSM8K_SOURCES = ("gsm8k", "gsm8k:train", "gsm8k:eval")
ROW_FORMATS = (
    "instruction/output (+ optional input, answer)",
    "prompt/completion (+ optional answer)",
    "messages: [{role, content}, ...] ending with an assistant message (+ optional answer)",
)
CHAT_ROLES = ("system", "user", "assistant", "tool")
# `auto` picks the template that matches how a record was written.
AUTO_TEMPLATE = {"alpaca": "alpaca", "completion": "raw", "chat": "chat"}
TOKENIZE_CHUNK = 1024  # records per batched tokenizer call


class DataError(ValueError):
    """A data source cannot be used; the message names the file (and line) and the problem."""


class Message(TypedDict):
    role: str
    content: str


class Record(TypedDict):
    """One training example before tokenisation.

    ``prompt`` is a string for ``alpaca`` (the instruction) and ``completion`` (the prompt text),
    and the list of messages before the response for ``chat``. ``input`` is the Alpaca context
    (empty when absent or for other kinds). ``answer`` is the gold answer or None.
    """

    kind: Literal["alpaca", "completion", "chat"]
    prompt: str | list[Message]
    input: str
    response: str
    answer: str | None


class Example(TypedDict):
    """One tokenised example (plain lists; ``Collator`` turns a batch into tensors).

    ``input_ids`` and ``labels`` have the same length T <= max_length; ``labels`` is
    ``IGNORE_INDEX`` on the P prompt tokens and equal to ``input_ids`` on the rest (response tokens
    and EOS, unless truncation cut it). ``prompt_ids == input_ids[:P]`` is what generation-based
    evaluation feeds the model; ``answer`` is the record's gold answer.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    answer: str | None


@dataclass
class TokenizeStats:
    """What ``tokenize_records`` did to the records it was given."""

    records: int = 0  # records in
    examples: int = 0  # examples out
    skipped_no_response: int = 0  # dropped: no response token left after truncation
    prompts_truncated: int = 0  # prompts cut to prompt_max_length (their start dropped)
    responses_truncated: int = 0  # kept examples whose response or EOS was cut at max_length
    tokens: int = 0  # sum of len(input_ids) over the examples
    response_tokens: int = 0  # labelled tokens (response + EOS) over the examples
    longest: int = 0  # longest len(input_ids)


# ---------------------------------------------------------------------------------------------
# Loading


def load_records(
    source: str | os.PathLike, gsm8k_seed: int = 0, gsm8k_eval_size: int = 200
) -> list[Record]:
    """Load a data source into ``Record`` dicts, in source order.

    Args:
        source: ``"gsm8k"`` (same as ``"gsm8k:train"``), ``"gsm8k:eval"``, or the path of a
            ``.json`` file (a JSON list of rows, e.g. LLM-Adapters' ``math_10k.json``) or a
            ``.jsonl`` file (one row per line; blank lines are ignored). Row formats: see the
            module docstring.
        gsm8k_seed, gsm8k_eval_size: the GSM8K split (``sparselora.recipes.assets.gsm8k_split``).

    Raises:
        DataError: unknown ``gsm8k:`` split, missing file, malformed JSON (with the 1-based line
            number for JSONL, line and column for JSON), a row without the fields of any format
            (naming the row and the allowed formats), or no records at all.
    """
    name = str(source).lower()
    if name == "gsm8k" or name.startswith("gsm8k:"):
        return _load_gsm8k(name, gsm8k_seed, gsm8k_eval_size)

    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist"
            + ("" if not path.exists() else " as a file")
            + f"; use a .json or .jsonl path, or one of {', '.join(GSM8K_SOURCES)}"
        )
    try:
        rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_json_list(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    records = [_to_record(row, where) for where, row in rows]
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    kinds = sorted({r["kind"] for r in records})
    logger.info("Loaded %d records (%s) from %s", len(records), ", ".join(kinds), path)
    return records


def _load_gsm8k(source: str, seed: int, eval_size: int) -> list[Record]:
    if source not in GSM8K_SOURCES:
        raise DataError(f"unknown data source {source!r}; the embedded GSM8K is {GSM8K_SOURCES}")
    train, held_out = gsm8k_split(seed=seed, eval_size=eval_size)
    rows = held_out if source == "gsm8k:eval" else train
    logger.info(
        "GSM8K %s split: %d records (seed %d)", source.partition(":")[2] or "train", len(rows), seed
    )
    return [
        Record(
            kind="chat",
            prompt=[Message(role="user", content=row["question"])],
            input="",
            response=row["answer"],
            answer=row["final_answer"],
        )
        for row in rows
    ]


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed row) for each non-blank line of a JSONL file."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}, line {line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {line_no}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
    return rows


def _read_json_list(path: Path) -> list[tuple[str, Any]]:
    """(location, row) for each element of a file holding one JSON list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        hint = " (one object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}){hint}"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}"
        )
    return [(f"{path}, index {i}", row) for i, row in enumerate(data)]


def _to_record(row: Any, where: str) -> Record:
    """Normalise one parsed row into a ``Record``; ``where`` names it in error messages."""
    allowed = "; ".join(ROW_FORMATS)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number")
    answer = None if answer is None else str(answer)

    if "messages" in row:
        prompt, response = _split_messages(row["messages"], where)
        return Record(kind="chat", prompt=prompt, input="", response=response, answer=answer)
    for kind, prompt_key, response_key in (
        ("completion", "prompt", "completion"),
        ("alpaca", "instruction", "output"),
    ):
        if prompt_key in row or response_key in row:
            missing = [k for k in (prompt_key, response_key) if k not in row]
            if missing:
                raise DataError(
                    f"{where}: missing field(s) {', '.join(map(repr, missing))}; "
                    f"allowed row formats: {allowed}"
                )
            for key in (prompt_key, response_key):
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: {key!r} must be a string")
            context = row.get("input") if kind == "alpaca" else None
            if context is not None and not isinstance(context, str):
                raise DataError(f"{where}: 'input' must be a string")
            return Record(
                kind=kind,
                prompt=row[prompt_key],
                input=context or "",
                response=row[response_key],
                answer=answer,
            )
    raise DataError(f"{where}: no known fields (has {sorted(row)}); allowed row formats: {allowed}")


def _split_messages(messages: Any, where: str) -> tuple[list[Message], str]:
    """Check a chat ``messages`` list; return (the messages before the reply, the reply text)."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{where}: 'messages' must be a list of at least two {{role, content}} objects "
            "(a prompt and the assistant reply)"
        )
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content'"
            )
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: messages[{i}] has role {message['role']!r}; allowed: {CHAT_ROLES}"
            )
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant reply (the response to learn), "
            f"got role {messages[-1]['role']!r}"
        )
    prompt = [Message(role=m["role"], content=m["content"]) for m in messages[:-1]]
    return prompt, messages[-1]["content"]


# ---------------------------------------------------------------------------------------------
# Prompt formatting


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca prompt, ending in ``"### Response:\\n"``; the input block only if ``context``."""
    if context:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT.format(instruction=instruction)


def format_prompt(
    record: Record, tokenizer: PreTrainedTokenizerBase | None = None, template: str = "auto"
) -> str:
    """The prompt text of ``record`` under ``template``; the response follows it directly.

    Templates:
        ``auto``: ``alpaca`` for alpaca records, ``raw`` for completion records, ``chat`` for chat
            records.
        ``alpaca``: the Alpaca prompt. Completion records use their prompt as the instruction;
            chat records must be a single user message.
        ``chat``: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``. Alpaca
            and completion records become one user message (instruction, a blank line, input).
        ``raw``: the prompt text as written (alpaca: instruction, a blank line, input); not for
            chat records.

    Raises:
        ValueError: unknown template, a chat record under ``alpaca``/``raw`` that is not one user
            message, or ``chat`` without a tokenizer that has a chat template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "auto":
        template = AUTO_TEMPLATE[record["kind"]]
    if template == "chat":
        messages = record["prompt"] if record["kind"] == "chat" else _as_user_message(record)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'chat' needs a tokenizer with a chat template; this one has none "
                "(use template 'alpaca' or 'raw')"
            )
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    instruction, context = _single_turn(record, template)
    if template == "alpaca":
        return alpaca_prompt(instruction, context)
    return f"{instruction}\n\n{context}" if context else instruction


def _single_turn(record: Record, template: str) -> tuple[str, str]:
    """(instruction, input) of a record that is a single prompt."""
    if record["kind"] != "chat":
        return record["prompt"], record["input"]
    prompt = record["prompt"]
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        raise ValueError(
            f"template {template!r} needs a single user message before the reply; this chat "
            f"record has roles {[m['role'] for m in prompt]} (use template 'chat')"
        )
    return prompt[0]["content"], ""


def _as_user_message(record: Record) -> list[Message]:
    content = record["prompt"]
    if record["input"]:
        content = f"{content}\n\n{record['input']}"
    return [Message(role="user", content=content)]


# ---------------------------------------------------------------------------------------------
# Tokenisation


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 512,
    prompt_max_length: int = 256,
    template: str = "auto",
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise records into examples whose loss covers only the response and EOS.

    For each record: P prompt ids (``format_prompt``; special tokens such as BOS added for the
    alpaca/raw templates, none for chat, whose template writes its own), then R response ids (no
    special tokens), then ``tokenizer.eos_token_id``. A prompt longer than ``prompt_max_length``
    keeps its LAST ``prompt_max_length`` tokens, so the ``### Response:`` line (or the assistant
    header) stays next to the response. The whole sequence is then cut to ``max_length`` from the
    end. Labels are ``IGNORE_INDEX`` on the prompt and the token ids elsewhere.

    An example left with no response token (empty response, or a prompt filling ``max_length``)
    is skipped and counted in ``stats.skipped_no_response``.

    Returns:
        ``(examples, stats)``: examples in record order, and what was cut or skipped.

    Raises:
        ValueError: bad lengths or template, a tokenizer without an EOS token, or no example left.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if prompt_max_length < 1:
        raise ValueError(f"prompt_max_length must be >= 1, got {prompt_max_length}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token first")

    stats = TokenizeStats(records=len(records))
    examples: list[Example] = []
    skipped_at: list[int] = []
    for start in range(0, len(records), TOKENIZE_CHUNK):
        chunk = records[start : start + TOKENIZE_CHUNK]
        prompt_ids = _tokenize_prompts(chunk, tokenizer, template)
        response_ids = tokenizer([r["response"] for r in chunk], add_special_tokens=False).input_ids
        for offset, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            if len(prompt) > prompt_max_length:
                prompt = prompt[-prompt_max_length:]
                stats.prompts_truncated += 1
            # Response tokens that fit after the prompt; the EOS only if room is left after them.
            kept = response[: max(0, max_length - len(prompt))]
            if not kept:
                stats.skipped_no_response += 1
                skipped_at.append(start + offset)
                continue
            target = kept + [eos_id] if len(prompt) + len(kept) < max_length else kept
            if len(target) < len(response) + 1:
                stats.responses_truncated += 1
            examples.append(
                Example(
                    input_ids=prompt + target,
                    labels=[IGNORE_INDEX] * len(prompt) + target,
                    prompt_ids=prompt,
                    answer=chunk[offset]["answer"],
                )
            )
            stats.tokens += len(prompt) + len(target)
            stats.response_tokens += len(target)
            stats.longest = max(stats.longest, len(prompt) + len(target))
    stats.examples = len(examples)

    if skipped_at:
        logger.warning(
            "Skipped %d of %d examples with no response token left after truncation "
            "(max_length=%d, prompt_max_length=%d); first indices: %s",
            len(skipped_at),
            len(records),
            max_length,
            prompt_max_length,
            skipped_at[:10],
        )
    if not examples:
        raise ValueError(
            f"no training example left: all {len(records)} records have no response token after "
            f"truncation (max_length={max_length}, prompt_max_length={prompt_max_length}); "
            "raise max_length above prompt_max_length, or check that responses are not empty"
        )
    logger.info(
        "Tokenised %d examples (%d tokens, %d labelled, longest %d; %d prompts and %d responses "
        "truncated)",
        stats.examples,
        stats.tokens,
        stats.response_tokens,
        stats.longest,
        stats.prompts_truncated,
        stats.responses_truncated,
    )
    return examples, stats


def _tokenize_prompts(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, template: str
) -> list[list[int]]:
    """Prompt ids per record; chat-rendered text gets no extra special tokens (no double BOS)."""
    texts = [format_prompt(r, tokenizer, template) for r in records]
    is_chat = [
        (template if template != "auto" else AUTO_TEMPLATE[r["kind"]]) == "chat" for r in records
    ]
    ids: list[list[int]] = [[] for _ in records]
    for chat in (True, False):
        positions = [i for i, flag in enumerate(is_chat) if flag == chat]
        if positions:
            encoded = tokenizer([texts[i] for i in positions], add_special_tokens=not chat)
            for i, row in zip(positions, encoded.input_ids, strict=True):
                ids[i] = row
    return ids


# ---------------------------------------------------------------------------------------------
# Batching


class Collator:
    """Pad a list of examples to the longest in the batch and stack them into LongTensors.

    Each feature needs ``input_ids`` (list or 1-D tensor) and either all features or none have
    ``labels`` of the same length; other keys (``prompt_ids``, ``answer``) are ignored. So
    ``Collator(pad_id, "left")([{"input_ids": ex["prompt_ids"]} for ex in batch])`` makes a
    generation batch.

    Returns ``input_ids`` (B, T) padded with ``pad_token_id``, ``attention_mask`` (B, T) with 1 on
    real tokens and 0 on padding, and ``labels`` (B, T) with ``IGNORE_INDEX`` on padding. T is the
    longest length in the batch, rounded up to ``pad_to_multiple_of`` if set. ``padding_side``
    "right" appends the padding, "left" prepends it (for batched generation). Padding never changes
    a row's positions relative to each other, so with rotary embeddings (LLaMA family) the loss is
    the same either way.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to eos_token)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        has_labels = "labels" in features[0]
        if any(("labels" in f) != has_labels for f in features):
            raise ValueError("either every feature of a batch has 'labels' or none has")
        lengths = [len(f["input_ids"]) for f in features]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for row, (feature, n) in enumerate(zip(features, lengths, strict=True)):
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, cols] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, cols] = 1
            if has_labels:
                if len(feature["labels"]) != n:
                    raise ValueError(
                        f"batch row {row}: {len(feature['labels'])} labels for {n} input_ids"
                    )
                labels[row, cols] = torch.as_tensor(feature["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}  # (B, T) each
        if has_labels:
            batch["labels"] = labels  # (B, T)
        return batch


CALIBRATION_EXAMPLES = 32  # examples the whitened estimator is fitted on, in batches of 4


def calibration_batches(
    examples: Sequence[Example], collator: Collator, count: int = CALIBRATION_EXAMPLES
) -> list[dict[str, torch.Tensor]]:
    """The first `count` examples in collated batches of 4: the whitened estimator's data.

    A fixed set (not the first batches of a shuffled stream) keeps the estimator identical
    when a run resumes from a checkpoint.
    """
    rows = list(examples[:count])
    return [collator(rows[i : i + 4]) for i in range(0, len(rows), 4)]
