"""Turn-taking between two training processes, so that both see the same machine conditions.

The demo trains LoRA and SparseLoRA at the same time, each in its own process, and makes them
take turns by blocks of `block` optimizer steps: one process trains while the other waits. The
turn order is A B B A A B B A ... (role 0 is A), so each pair of blocks is played once in each
order and a slowdown that starts halfway hits both runs alike. Model loading, data and
estimator calibration before step 0 overlap; the two processes meet at the start of training
and then only the blocks alternate.

The processes share a folder (`SPARSELORA_TURNS`, set by the demo for each `sparselora train`):

    FOLDER/turn        how many turns have been played (the next turn's number); no file: 0
    FOLDER/pid-R       the process id of role R, written when its run starts
    FOLDER/ready-R     role R has loaded and is about to train
    FOLDER/done-R      role R has finished its steps

A process whose partner has finished its steps or died (a done marker, or no live process with
the partner's pid) no longer waits, so neither process can deadlock the other.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

TURNS_ENV = "SPARSELORA_TURNS"
POLL_SECONDS = 0.005


def turn_number(role: int, block_index: int) -> int:
    """The turn at which `role` plays its block `block_index`: turns go A B B A A B B A ..."""
    pair, second = divmod(block_index, 2)
    if role == 0:
        return 4 * pair + (3 if second else 0)
    return 4 * pair + (2 if second else 1)


def turns_taken(folder: Path) -> int:
    """How many turns have been played in the shared `folder`."""
    try:
        return int((Path(folder) / "turn").read_text())
    except (FileNotFoundError, ValueError):
        return 0


class TurnTaking(TrainerCallback):
    """An HF Trainer callback that plays role `role` (0 or 1) of a turn-taking pair in `folder`.

    Place it before RunRecorder in the Trainer's callbacks: its waits then happen before the
    recorder's step timer starts. It records each of its blocks in `blocks` ({"first_step":
    0-based optimizer step, "steps": n, "seconds": the sum of the block's step times, waits
    left out, the device synchronized at the block's end}) and the seconds it waited after
    training began (turns, and the end) in `waited_seconds`. The meeting at the start of
    training comes before RunRecorder starts its clock and is not counted.

    The turn is held from the first step of a block until the process reaches its next block or
    the end of training, so that the logging and evaluation after a block's last step do not run
    during the partner's block. At the end it waits for the partner's last block, so that its
    own final evaluation does not overlap it either.
    """

    def __init__(self, folder: str | Path, role: int, block: int) -> None:
        self.folder = Path(folder)
        self.role = role
        self.partner = 1 - role
        self.block = block
        self.blocks: list[dict] = []
        self.waited_seconds = 0.0
        self._holding = False
        self._block_steps = 0
        self._block_seconds = 0.0
        self._block_first_step = 0
        self._step_start = 0.0
        self._write(f"pid-{role}", str(os.getpid()))

    @classmethod
    def from_environment(cls, environ=os.environ) -> TurnTaking | None:
        """The turn-taking that `SPARSELORA_TURNS` ({"folder", "role", "block"} as JSON, set by
        the demo) asks for; None when it is not set."""
        value = environ.get(TURNS_ENV)
        if not value:
            return None
        try:
            spec = json.loads(value)
            folder, role, block = spec["folder"], spec["role"], spec["block"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(
                f'{TURNS_ENV} must be JSON {{"folder": PATH, "role": 0 or 1, "block": N >= 1}}, '
                f"got {value!r}"
            ) from None
        if role not in (0, 1) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{TURNS_ENV}: role must be 0 or 1 and block >= 1, got {value!r}")
        return cls(folder, role, block)

    # -- the protocol ------------------------------------------------------------------------

    def partner_gone(self) -> bool:
        """Whether the partner has finished its steps or is no longer running."""
        if (self.folder / f"done-{self.partner}").exists():
            return True
        try:
            pid = int((self.folder / f"pid-{self.partner}").read_text())
        except (FileNotFoundError, ValueError):
            return False  # not started yet (the demo stops us if it never starts)
        return not _alive(pid)

    def wait_until(self, ready) -> float:
        """Sleep-poll until `ready()` or the partner is gone; returns the seconds waited."""
        start = time.perf_counter()
        while not ready() and not self.partner_gone():
            time.sleep(POLL_SECONDS)
        return time.perf_counter() - start

    def hand_over(self) -> None:
        """End the turn this process holds: the next turn may start."""
        if self._holding:
            played = turn_number(self.role, len(self.blocks) - 1)
            self._write("turn", str(played + 1))
            self._holding = False

    def _write(self, name: str, text: str) -> None:
        tmp = self.folder / f".{name}.{self.role}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.folder / name)  # readers see the old or the new text, never half

    # -- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(f"ready-{self.role}", "")
        self.wait_until(lambda: (self.folder / f"ready-{self.partner}").exists())

    def on_step_begin(self, args, state, control, **kwargs):
        if self._block_steps == 0:
            self.hand_over()
            turn = turn_number(self.role, len(self.blocks))
            self.waited_seconds += self.wait_until(lambda: turns_taken(self.folder) >= turn)
            self._holding = True
            self._block_first_step = state.global_step
            self._block_seconds = 0.0
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        last = self._block_steps + 1 == self.block or state.global_step >= state.max_steps
        if last and torch.cuda.is_available():
            torch.cuda.synchronize()  # this block's kernels finish in this block's turn
        self._block_seconds += time.perf_counter() - self._step_start
        self._block_steps += 1
        if last:
            self._close_block()

    def on_train_end(self, args, state, control, **kwargs):
        if self._block_steps:  # training stopped inside a block
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._close_block()
        self._write(f"done-{self.role}", "")
        self.hand_over()
        self.waited_seconds += self.wait_until(lambda: False)  # until the partner is gone

    def _close_block(self) -> None:
        self.blocks.append(
            {
                "first_step": self._block_first_step,
                "steps": self._block_steps,
                "seconds": self._block_seconds,
            }
        )
        self._block_steps = 0


def _alive(pid: int) -> bool:
    """Whether process `pid` is running (an exited child its parent has not reaped is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): the signal check is all we have
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
