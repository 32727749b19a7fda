"""The decision half of `calibrate` on hand-written numbers: statistics, choice and repair."""

from __future__ import annotations

import math

import pytest

from sparselora.recipes.preset_choice import (
    Change,
    Option,
    by_rate,
    choose,
    paired_change,
    search,
    spec,
    t_quantile_975,
)


@pytest.mark.parametrize(
    "df, exact",
    [(1, 12.7062), (5, 2.5706), (10, 2.2281), (15, 2.1314), (30, 2.0423), (100, 1.9840)],
)
def test_t_quantile_matches_tables(df, exact):
    assert t_quantile_975(df) == pytest.approx(exact, abs=1e-3)


def test_paired_change_on_hand_computed_values():
    # differences 1, 1, 1, 2: mean 1.25, sd 0.5; dense mean 4 -> +31.25%;
    # half-width t(3) * 0.5 / sqrt(4) / 4 * 100 = 3.1824 * 6.25 = 19.89%
    change = paired_change([2.0, 4.0, 6.0, 9.0], [1.0, 3.0, 5.0, 7.0])
    assert change.percent == pytest.approx(31.25)
    assert change.half_width == pytest.approx(3.18245 * 6.25, rel=1e-4)
    assert change.examples == 4
    assert change.lower == pytest.approx(31.25 - change.half_width)


def test_paired_change_is_paired_not_pooled():
    # Examples differ wildly in loss, the sparse model adds exactly 0.1 to each: zero spread.
    dense = [0.5, 9.0, 3.0, 20.0]
    change = paired_change([d + 0.1 for d in dense], dense)
    assert change.half_width == pytest.approx(0.0, abs=1e-9)
    assert change.percent == pytest.approx(100 * 0.4 / sum(dense))


def test_paired_change_needs_two_equal_lists():
    with pytest.raises(ValueError):
        paired_change([1.0], [1.0])
    with pytest.raises(ValueError):
        paired_change([1.0, 2.0], [1.0, 2.0, 3.0])


def opt(block, layer, sparsity, percent, saved, half=0.0, n=32) -> Option:
    return Option(block, layer, sparsity, Change(percent, half, n), saved)


def test_choose_maximises_saving_within_budget():
    options = [
        opt("ffn", 0, 0.9, 0.40, 10.0),
        opt("ffn", 1, 0.9, 0.30, 9.0),
        opt("ffn", 2, 0.9, 0.20, 8.0),
        opt("ffn", 2, 0.5, 0.05, 5.0),
        opt("ffn", 3, 0.9, -0.10, 1.0),  # a lower loss is a change too: it costs 0.10
        opt("attn", 3, 0.5, 0.01, 100.0, half=0.6),  # saves most, but its interval exceeds
    ]
    chosen = choose(options, budget=0.5)
    # 0.5 of budget: {1@0.9, 2@0.9} = 17 beats {0@0.9, 2@0.5} = 15 and {1, 2@0.5, 3} = 15.
    assert {g: o.sparsity for g, o in chosen.items()} == {("ffn", 1): 0.9, ("ffn", 2): 0.9}
    assert spec(chosen) == {"ffn_sparsity": {"1-2": 0.9}, "attn_sparsity": {}}


def test_a_block_that_lowers_the_loss_a_lot_is_not_used():
    options = [opt("ffn", 10, 0.9, -0.8, 50.0, half=0.2), opt("ffn", 25, 0.9, 0.02, 5.0, half=0.1)]
    assert set(choose(options, budget=0.5)) == {("ffn", 25)}
    assert options[0].cost == pytest.approx(0.8) and options[0].change.magnitude == pytest.approx(
        1.0
    )


def test_choose_for_a_speedup_takes_the_least_loss():
    options = [
        opt("ffn", 0, 0.9, 2.0, 10.0),
        opt("ffn", 1, 0.9, 0.3, 6.0),
        opt("ffn", 2, 0.9, 0.2, 5.0),
        opt("ffn", 2, 0.5, 0.05, 3.0),
    ]
    chosen = choose(options, needed_saving=9.0)  # 1@0.9 + 2@0.5 (0.35) beats 0@0.9 (2.0)
    assert {g: o.sparsity for g, o in chosen.items()} == {("ffn", 1): 0.9, ("ffn", 2): 0.5}
    everything = choose(options, needed_saving=1e9)  # unreachable: the largest saving
    assert sum(o.saved for o in everything.values()) == 21.0
    with pytest.raises(ValueError):
        choose(options)


def additive_plus_interaction(options, pair, penalty):
    """A hand-written 'model': one-layer costs add, except `pair` together costs `penalty`
    more (the SmolLM2 finding: harmless layers that are not harmless together)."""

    def measure(assignment) -> Change:
        total = sum(o.change.percent for o in assignment.values())
        if all(g in assignment for g in pair):
            total += penalty
        return Change(total, 0.05, 64)

    return measure


def test_search_repairs_a_non_additive_combination():
    options = [
        opt("ffn", 1, 0.9, 0.05, 10.0),
        opt("ffn", 2, 0.9, 0.05, 10.0),
        opt("ffn", 3, 0.9, 0.10, 10.0),  # the costliest per FLOP: the first to go
        opt("ffn", 4, 0.9, 0.05, 10.0),
        opt("ffn", 5, 0.9, 0.04, 10.0),
    ]
    assert [o.layer for o in by_rate({o.group: o for o in options})] == [5, 4, 2, 1, 3]
    measure = additive_plus_interaction(options, [("ffn", 3), ("ffn", 4)], penalty=1.5)
    result = search(options, measure, lambda a: 1 + len(a) / 10, budget=0.5)
    first = result.rounds[0]
    assert len(first.assignment) == 5 and not first.fits  # one-layer sum 0.29, measured 1.79
    # bisection over the cheapest-first prefixes of 5: 2 fit, 3 fit, 4 = {5, 4, 2, 1} fit
    assert result.fits and [len(r.assignment) for r in result.rounds] == [5, 2, 3, 4]
    assert set(result.chosen) == {("ffn", 1), ("ffn", 2), ("ffn", 4), ("ffn", 5)}
    assert result.rounds[-1].change.upper <= 0.5
    assert all(r.change.upper > 0.5 for r in result.rounds if not r.fits)


def test_search_finds_the_interaction_even_when_the_culprits_look_cheapest():
    # The two cheapest-looking blocks per FLOP are the pair that hurts together.
    options = [opt("ffn", i, 0.9, 0.02 if i in (7, 8) else 0.06, 10.0) for i in range(4, 10)]
    measure = additive_plus_interaction(options, [("ffn", 7), ("ffn", 8)], penalty=3.0)
    result = search(options, measure, lambda a: 1 + len(a) / 10, budget=0.5)
    assert result.fits and len(result.chosen) == 1  # only one of the pair survives
    assert result.chosen.keys() <= {("ffn", 7), ("ffn", 8)}
    assert not {("ffn", 7), ("ffn", 8)} <= set(result.chosen)


def test_search_gives_up_after_max_rounds_with_no_sparsity():
    options = [opt("ffn", i, 0.9, 0.01, 10.0) for i in range(6)]

    def measure(assignment) -> Change:
        return Change(5.0 if assignment else 0.0, 0.1, 64)

    exhausted = search(options, measure, lambda a: 1.0, budget=0.5, max_rounds=2)
    assert len(exhausted.rounds) == 2 and not exhausted.fits and exhausted.chosen == {}
    assert exhausted.rounds[-1].action == "rounds exhausted"
    nothing = search(options, measure, lambda a: 1.0, budget=0.5)
    assert [len(r.assignment) for r in nothing.rounds] == [6, 3, 1] and nothing.chosen == {}


def test_search_for_a_target_measures_once():
    options = [opt("ffn", i, 0.9, 0.1 * i, 10.0) for i in range(4)]
    calls = []

    def measure(assignment) -> Change:
        calls.append(dict(assignment))
        return Change(1.0, 0.1, 64)

    def speedup(assignment) -> float:
        return 1.0 + 0.1 * len(assignment)

    result = search(options, measure, speedup, target_speedup=1.2, needed_saving=20.0)
    assert len(calls) == 1 and result.fits
    assert set(result.chosen) == {("ffn", 0), ("ffn", 1)}  # the two cheapest reach 20
    assert math.isclose(result.rounds[0].speedup, 1.2)
