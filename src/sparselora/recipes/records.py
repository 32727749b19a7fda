"""Training and evaluation data as records: the sources and row formats `load_records` reads.

Sources:

- ``"gsm8k"``, ``"gsm8k:train"``, ``"gsm8k:eval"``: the embedded GSM8K split of
  ``sparselora.recipes.assets.gsm8k_split`` (1,119 train / 200 held-out problems with the
  defaults). The question is a user chat message, the response the worked solution ending in
  ``#### N``, the gold answer ``N``.
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
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, TypedDict

from sparselora.config import read_text
from sparselora.recipes.assets import gsm8k_split

logger = logging.getLogger(__name__)

GSM8K_SOURCES = ("gsm8k", "gsm8k:train", "gsm8k:eval")
ROW_FORMATS = (
    "instruction/output (+ optional input, answer)",
    "prompt/completion (+ optional answer)",
    "messages: [{role, content}, ...] ending with an assistant message (+ optional answer)",
)
CHAT_ROLES = ("system", "user", "assistant", "tool")


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
        DataError: unknown ``gsm8k:`` split, missing file, a byte that is not UTF-8 (with its
            line and column), malformed JSON (with the 1-based line number for JSONL, line and
            column for JSON), a row without the fields of any format
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
    text = read_text(path, DataError)
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path, text)
    else:
        rows = _read_json_list(path, text)
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


def _read_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    """(location, parsed row) for each non-blank line of JSONL file `path`, whose text is `text`.

    Lines end at "\n" only: U+2028 and friends may stand unescaped inside JSON strings."""
    rows = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}, line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {line_no}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
    return rows


def _read_json_list(path: Path, text: str) -> list[tuple[str, Any]]:
    """(location, row) for each element of JSON file `path`, whose text `text` is one list."""
    try:
        data = json.loads(text)
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
