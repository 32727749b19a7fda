"""The decision half of `sparselora calibrate`: statistics and the choice of a preset.

Pure functions on numbers (no model): the measurement half (`recipes/calibrate.py`) gives each
option (a block of one layer at one sparsity) its measured one-layer loss change and its
predicted FLOPs saving; this module picks the assignment, and repairs it when the measured
combination does not fit (one-layer effects are not additive).

Loss changes are in percent of the dense model's held-out loss, measured as paired per-example
differences on the same examples (see `paired_change`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sparselora.config import compact_layers

BLOCKS = ("ffn", "attn")

# Resolution of the knapsack's loss axis, in percentage points of loss change.
LOSS_STEP = 0.005


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95%).

    Tabled values (4 decimals) below df 10; above, the Cornish-Fisher expansion around the
    normal quantile, within 0.001 of the exact value.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    exact = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646}
    exact.update({8: 2.3060, 9: 2.2622})
    if df in exact:
        return exact[df]
    z = 1.959964
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Change:
    """A held-out loss change in percent with its two-sided 95% confidence interval."""

    percent: float
    half_width: float
    examples: int

    @property
    def lower(self) -> float:
        return self.percent - self.half_width

    @property
    def upper(self) -> float:
        return self.percent + self.half_width

    @property
    def magnitude(self) -> float:
        """The largest change, in either direction, the interval admits."""
        return max(abs(self.lower), abs(self.upper))

    def __str__(self) -> str:
        return f"{self.percent:+.2f}% ± {self.half_width:.2f} (n={self.examples})"


def paired_change(sparse: Sequence[float], dense: Sequence[float]) -> Change:
    """Loss change of `sparse` against `dense`, paired on the same examples.

    sparse[i], dense[i]: the summed token cross-entropy of example i with and without sparsity.
    The change is 100 * sum(sparse - dense) / sum(dense), the change of the token-weighted mean
    loss; its interval treats the per-example differences d_i as a sample (the dense total as
    fixed): half-width = t(0.975, n-1) * sd(d) / sqrt(n) / mean(dense) * 100.
    """
    n = len(sparse)
    if n != len(dense) or n < 2:
        raise ValueError(f"need two equal-length lists of >= 2 examples, got {n} and {len(dense)}")
    diffs = [s - d for s, d in zip(sparse, dense, strict=True)]
    mean_dense = sum(dense) / n
    mean_diff = sum(diffs) / n
    variance = sum((d - mean_diff) ** 2 for d in diffs) / (n - 1)
    half = t_quantile_975(n - 1) * math.sqrt(variance / n) / mean_dense * 100
    return Change(100 * mean_diff / mean_dense, half, n)


@dataclass(frozen=True)
class Option:
    """One block of one layer at one sparsity: its one-layer loss change and FLOPs saving."""

    block: str  # "ffn" or "attn"
    layer: int
    sparsity: float
    change: Change
    saved: float  # predicted training FLOPs saved per step against the dense-branch run

    @property
    def group(self) -> tuple[str, int]:
        return (self.block, self.layer)

    @property
    def cost(self) -> float:
        """What the choice charges: the size of the measured change in either direction.

        A block whose removal lowers the loss before fine-tuning is not free: it changes what
        the model computes, and on SmolLM2 such a block (layer 10's FFN, -0.8% alone) was the
        one that widened the gap to LoRA after fine-tuning (docs/SMOLLM2_PRESET.md).
        """
        return abs(self.change.percent)


Assignment = dict[tuple[str, int], Option]


def spec(assignment: Mapping[tuple[str, int], Option]) -> dict[str, dict[str, float]]:
    """{'ffn_sparsity': {'23-29': 0.9}, 'attn_sparsity': {...}} for an assignment."""
    return {
        f"{block}_sparsity": compact_layers(
            {layer: o.sparsity for (b, layer), o in assignment.items() if b == block}
        )
        for block in BLOCKS
    }


def usable(options: Sequence[Option], budget: float | None) -> list[Option]:
    """Options worth choosing: they save FLOPs and, under a budget, their whole interval lies
    within +-budget (a block that alone may change the loss by the whole budget, in either
    direction, is never chosen)."""
    return [o for o in options if o.saved > 0 and (budget is None or o.change.magnitude <= budget)]


def _groups(options: Sequence[Option]) -> dict[tuple[str, int], list[Option]]:
    groups: dict[tuple[str, int], list[Option]] = {}
    for option in sorted(options, key=lambda o: (o.group, o.sparsity)):
        groups.setdefault(option.group, []).append(option)
    return groups


def _knapsack(
    options: Sequence[Option], capacity: int, step: float = LOSS_STEP
) -> list[tuple[float, Assignment]]:
    """Multiple-choice knapsack: for every loss capacity c (in `step` units of percent) up to
    `capacity`, the assignment (at most one option per block and layer) that saves the most
    FLOPs with summed cost <= c * step. Returns best[c] = (saved, assignment)."""
    # best[c] = (saved, chain): chain is a linked list (option, rest) of the options taken.
    best: list[tuple[float, tuple | None]] = [(0.0, None)] * (capacity + 1)
    for choices in _groups(options).values():
        weighted = [(math.ceil(o.cost / step - 1e-9), o) for o in choices]
        new = list(best)
        for c in range(capacity + 1):
            for weight, option in weighted:
                if weight <= c:
                    saved, chain = best[c - weight]
                    if saved + option.saved > new[c][0]:
                        new[c] = (saved + option.saved, (option, chain))
        best = new

    def unchain(chain: tuple | None) -> Assignment:
        taken: Assignment = {}
        while chain is not None:
            option, chain = chain
            taken[option.group] = option
        return taken

    return [(saved, unchain(chain)) for saved, chain in best]


def choose(
    options: Sequence[Option],
    *,
    budget: float | None = None,
    needed_saving: float | None = None,
) -> Assignment:
    """The assignment that saves the most FLOPs with summed one-layer cost (the size of each
    change, `Option.cost`) <= `budget` (%), or,
    with `needed_saving`, the one that saves at least that many FLOPs at the least summed cost
    (the largest saving if none reaches it). Exactly one of the two must be given."""
    if (budget is None) == (needed_saving is None):
        raise ValueError("give exactly one of budget and needed_saving")
    candidates = usable(options, budget)
    if budget is not None:
        return _knapsack(candidates, int(round(budget / LOSS_STEP)))[-1][1]
    total_cost = sum(max((o.cost for o in g), default=0.0) for g in _groups(candidates).values())
    step = max(LOSS_STEP, total_cost / 4000)  # bounds the table for very costly option sets
    best = _knapsack(candidates, math.ceil(total_cost / step) + 1, step)
    for saved, assignment in best:
        if saved >= needed_saving:
            return assignment
    return best[-1][1]


def by_rate(assignment: Assignment) -> list[Option]:
    """The chosen blocks, cheapest per FLOP saved first: the largest change the one-layer
    interval admits, in either direction, over the saving (a block measured as harmless but
    imprecisely ranks after one measured precisely)."""
    return sorted(assignment.values(), key=lambda o: (o.change.magnitude / o.saved, -o.layer))


@dataclass
class Round:
    """One measured combination: what was tried, what it cost, what it saves."""

    assignment: Assignment
    change: Change
    speedup: float  # predicted training-step speedup over LoRA at the calibration shape
    fits: bool
    action: str = ""  # what the repair did with this result


@dataclass
class Search:
    """Every round of the choose-measure-repair loop, and the chosen assignment."""

    rounds: list[Round] = field(default_factory=list)
    chosen: Assignment = field(default_factory=dict)
    fits: bool = False


def search(
    options: Sequence[Option],
    measure: Callable[[Assignment], Change],
    speedup_of: Callable[[Assignment], float],
    *,
    budget: float | None = None,
    target_speedup: float | None = None,
    needed_saving: float | None = None,
    max_rounds: int = 12,
) -> Search:
    """Choose, measure the combination, repair until it fits.

    With a loss `budget` (%), a combination fits when its measured change is within +-budget
    (its interval is reported beside it: on a few dozen examples it can be wider than a small
    budget). If the first choice does not fit, its blocks are ranked by loss per FLOP
    saved (`by_rate`) and the longest cheapest-first prefix that fits is found by bisection:
    each round drops the costliest half of the blocks still in doubt, or adds back the cheaper
    half of those dropped, so n blocks take about log2(n) + 1 measurements (one-layer effects
    do not add up, so every candidate is measured, never predicted). At most `max_rounds`
    measurements; if none fits, nothing is chosen. With a `target_speedup` (and the
    `needed_saving` in FLOPs that reaches it), the least-cost assignment is measured once; it
    fits when its predicted speedup reaches the target.
    """
    result = Search()

    def attempt(assignment: Assignment) -> Round:
        change = measure(assignment)
        speedup = speedup_of(assignment)
        if budget is not None:
            fits = abs(change.percent) <= budget
        else:
            fits = speedup >= target_speedup - 1e-9
        result.rounds.append(Round(dict(assignment), change, speedup, fits))
        if fits:
            result.chosen, result.fits = dict(assignment), True
        return result.rounds[-1]

    first = choose(options, budget=budget, needed_saving=needed_saving)
    if attempt(first).fits or budget is None:
        return result
    ranked = by_rate(first)
    fitting, failing = 0, len(ranked)  # prefixes known to fit (the empty one) and not to
    while failing - fitting > 1 and len(result.rounds) < max_rounds:
        size = (fitting + failing) // 2
        result.rounds[-1].action = f"try the {size} cheapest blocks per FLOP"
        if attempt({o.group: o for o in ranked[:size]}).fits:
            fitting = size
        else:
            failing = size
    if failing - fitting > 1:
        result.rounds[-1].action = "rounds exhausted"
    elif not result.fits:
        result.rounds[-1].action = "not even the cheapest block fits"
    return result
