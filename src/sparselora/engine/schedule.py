"""When to be sparse: dense for the first `start_step` fraction of optimizer steps, sparse until
`end_step`, then dense again. A plain schedule for custom loops and an HF Trainer callback."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from sparselora.engine.handle import SparseLoRA


class SparseSchedule:
    """Sparse on optimizer steps [round(start_step * total), ceil(end_step * total))."""

    def __init__(self, total_steps: int, start_step: float = 0.05, end_step: float = 1.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.first_sparse = round(start_step * total_steps)
        self.end = math.ceil(end_step * total_steps)

    def is_sparse(self, step: int) -> bool:
        """Whether 0-based optimizer step `step` runs sparse."""
        return self.first_sparse <= step < self.end

    def apply(self, handle: SparseLoRA, step: int) -> None:
        """Enable or disable `handle` for `step`."""
        if self.is_sparse(step):
            handle.enable()
        else:
            handle.disable()


class SparseLoRACallback(TrainerCallback):
    """HF Trainer callback: follows `handle.config`'s start_step / end_step over max_steps."""

    def __init__(self, handle: SparseLoRA) -> None:
        self.handle = handle
        self.schedule: SparseSchedule | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        config = self.handle.config
        self.schedule = SparseSchedule(max(1, state.max_steps), config.start_step, config.end_step)
        self.schedule.apply(self.handle, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.apply(self.handle, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.enable()
