"""Running sparsity statistics of a handle, for per-step logging."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SparsityStats:
    """Totals since the last `window()` call, plus running totals since the handle was made.

    Kept fractions are averaged over every sparse block selection of the window.
    flops_saved (running total): the FLOPs the sparse and skipped work did not spend, counted
      once per forward however often gradient checkpointing recomputes it: the frozen
      projections' forward and, in forwards run with gradients on, their input-gradient
      backward; the LoRA branches of the rows the last layer skips (forward, weight and input
      gradients); the last layer's attention core on the query rows no loss reads (QK^T and
      AV, forward and backward); the LM head on the positions no loss reads (forward and input
      gradient).
      2 FLOPs per multiply-add: the saving `engine.flops.step_flops` predicts (LoRA total minus
      SparseLoRA total without the estimator), except that it assumes an input gradient for
      every sparse frozen projection (layer 0's q/k/v need none when no adapter lies upstream:
      over-counted) and leaves out the LoRA slicing of `sparse_lora_branch` (under-counted).
    dense_steps (running total): training-mode forwards of the model (micro-batches) that ran
      dense because the whitened estimator was not calibrated yet, where the schedule wanted
      them sparse (outside `handle.dense()`, with the handle enabled).
    """

    flops_saved: float = 0.0
    dense_steps: int = 0
    _sums: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def window(self) -> dict[str, float]:
        """Averages (kept fractions) and totals (seconds) since the last call, then the running
        totals `flops_saved` and `dense_steps`; resets the window."""
        out: dict[str, float] = {}
        for name, total in self._sums.items():
            if name.endswith("_kept"):
                out[name] = total / self._counts[name]
            else:
                out[name] = total
        out["flops_saved"] = self.flops_saved
        out["dense_steps"] = self.dense_steps
        self._sums.clear()
        self._counts.clear()
        return out
