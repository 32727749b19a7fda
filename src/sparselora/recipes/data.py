"""Training data as tensors: format prompts, tokenise with response-only labels, pad batches.

The pipeline is three plain steps, each usable on its own::

    records = load_records("math_10k.json")             # list of Record dicts (records.py)
    examples, stats = tokenize_records(records, tokenizer, max_length=512)
    batch = Collator(tokenizer.pad_token_id)(examples[:8])  # input_ids, attention_mask, labels

Tokenisation follows the paper (docs/METHOD.md, section 12 'Data and evaluation'): loss on the
response only, EOS appended, prompts cut at 256 tokens, sequences at 512. The prompt and the
response are tokenised separately and concatenated, so the prompt ids a model sees in training
are exactly the ids it is given at generation time (``Example["prompt_ids"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from sparselora.config import IGNORE_INDEX
from sparselora.recipes.records import Message, Record

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
# `auto` picks the template that matches how a record was written.
AUTO_TEMPLATE = {"alpaca": "alpaca", "completion": "raw", "chat": "chat"}
TOKENIZE_CHUNK = 1024  # records per batched tokenizer call


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
            records, or ``alpaca`` for them when the tokenizer has no chat template (a base
            model such as Gemma-3-270M).
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
    template = resolved_template(record, tokenizer, template)
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


def resolved_template(
    record: Record, tokenizer: PreTrainedTokenizerBase | None, template: str
) -> str:
    """The template ``record`` is formatted with: ``template``, or what ``auto`` means for it."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template != "auto":
        return template
    template = AUTO_TEMPLATE[record["kind"]]
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        return "alpaca"  # a base model's tokenizer: single-turn chat records as Alpaca prompts
    return template


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
        prompt_ids = tokenize_prompts(chunk, tokenizer, template)
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


def tokenize_prompts(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, template: str
) -> list[list[int]]:
    """Prompt ids per record; chat-rendered text gets no extra special tokens (no double BOS)."""
    texts = [format_prompt(r, tokenizer, template) for r in records]
    is_chat = [resolved_template(r, tokenizer, template) == "chat" for r in records]
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
