"""Running sparsity statistics of a handle, for per-step logging."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SparsityStats:
    """Totals since the last `window()` call, plus FLOPs saved since the handle was made.

    Kept fractions are averaged over every sparse block selection of the window; FLOPs saved
    count the frozen projections' forward and, when gradients are on, their input-gradient
    backward (2 FLOPs per multiply-add).
    """

    flops_saved: float = 0.0
    _sums: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def window(self) -> dict[str, float]:
        """Averages (kept fractions) and totals (seconds) since the last call; then reset."""
        out: dict[str, float] = {}
        for name, total in self._sums.items():
            if name.endswith("_kept"):
                out[name] = total / self._counts[name]
            else:
                out[name] = total
        out["flops_saved"] = self.flops_saved
        self._sums.clear()
        self._counts.clear()
        return out
