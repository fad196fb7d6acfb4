"""Mixed precision allocation: optimality against brute force, the certified bound when the exact search
is cut short, monotonicity, dominated options, tie groups, the dual problem and budget parsing."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugal.analysis.allocate import (Option, allocate, bytes_for_bpw, group_options, parse_budget, smallest_within, solve,
                             summary, tie_groups)
from frugal.errors import FrugalError

TOL = 1e-9


# ----------------------------------------------------------------------------------------- helpers

@st.composite
def instances(draw, integer_damage: bool = False):
    """1-6 groups x 1-5 options, random bytes and damages (integers/64 when `integer_damage`, so
    every sum is exact in floating point)."""
    options = {}
    for g in range(draw(st.integers(1, 6))):
        opts = []
        for j in range(draw(st.integers(1, 5))):
            nbytes = draw(st.integers(0, 60))
            if integer_damage:
                damage = draw(st.integers(0, 640)) / 64
            else:
                damage = draw(st.floats(0, 10, allow_nan=False, allow_infinity=False))
            opts.append(Option(f"f{j}", nbytes, damage))
        options[f"g{g}"] = opts
    return options


def all_choices(options):
    """(bytes, damage) of every combination, as arrays (at most 5^6 = 15625 entries)."""
    b, d = np.zeros(1, dtype=np.int64), np.zeros(1)
    for opts in options.values():
        b = (b[:, None] + np.array([o.bytes for o in opts])).ravel()
        d = (d[:, None] + np.array([o.damage for o in opts])).ravel()
    return b, d


def brute_min_damage(options, max_bytes):
    b, d = all_choices(options)
    return d[b <= max_bytes].min()


def min_bytes(options):
    return sum(min(o.bytes for o in opts) for opts in options.values())


def max_bytes(options):
    return sum(max(o.bytes for o in opts) for opts in options.values())


def chosen(options, choice):
    return {g: next(o for o in options[g] if o.fmt == choice[g]) for g in options}


def largest_hull_step(options):
    """The largest damage saved by one step between neighbouring points of a group's lower convex
    hull of non-dominated (bytes, damage) points: the stated bound of a search cut short. Computed
    by definition: a point is on the hull unless a chord between two others passes below it."""
    largest = 0.0
    for opts in options.values():
        pts = sorted({(o.bytes, o.damage) for o in opts})
        front = [p for p in pts if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in pts)]

        def below(p):
            for a in front:
                for c in front:
                    if a[0] < p[0] < c[0]:
                        t = (p[0] - a[0]) / (c[0] - a[0])
                        if a[1] + t * (c[1] - a[1]) < p[1] - 1e-12:
                            return True
            return False

        hull = [p for p in front if not below(p)]
        largest = max([largest] + [hull[k][1] - hull[k + 1][1] for k in range(len(hull) - 1)])
    return largest


# ----------------------------------------------------------------------------------------- optimality

@settings(max_examples=300, deadline=None)
@given(instances(), st.floats(0, 1))
def test_allocate_matches_brute_force(options, where):
    budget = min_bytes(options) + round(where * (max_bytes(options) - min_bytes(options)))
    result = solve(options, max_bytes=budget)
    best = brute_min_damage(options, budget)
    assert result.exact
    assert result.damage == pytest.approx(best, abs=TOL)
    assert result.bound <= best + TOL
    total = summary(options, result.choice)
    assert total["bytes"] == result.bytes <= budget
    assert total["damage"] == result.damage
    assert allocate(options, budget) == result.choice


@settings(max_examples=300, deadline=None)
@given(instances(), st.floats(0, 1))
def test_search_cut_short_stays_within_the_certified_bound(options, where):
    """With the exact search stopped at once the incumbent is returned: its damage lies between the
    reported lower bound and that bound plus one hull step of one group."""
    budget = min_bytes(options) + round(where * (max_bytes(options) - min_bytes(options)))
    result = solve(options, max_bytes=budget, max_states=1)
    best = brute_min_damage(options, budget)
    assert result.bytes <= budget
    assert result.bound <= best + TOL <= result.damage + 2 * TOL
    assert result.damage - best <= result.damage - result.bound + TOL
    assert result.damage - result.bound <= largest_hull_step(options) + TOL


def test_greedy_alone_is_not_optimal_here_but_the_search_is():
    """An instance where the best damage-per-byte upgrades lead the wrong way: the exact search must
    move away from the greedy incumbent."""
    options = {
        "a": [Option("small", 0, 10.0), Option("big", 6, 0.0)],  # 10/6 per byte
        "b": [Option("small", 0, 8.0), Option("big", 5, 0.0)],  # 8/5 per byte
        "c": [Option("small", 0, 8.0), Option("big", 5, 0.0)],
    }
    greedy = solve(options, max_bytes=10, max_states=1)
    assert greedy.choice == {"a": "big", "b": "small", "c": "small"} and not greedy.exact
    exact = solve(options, max_bytes=10)
    assert exact.choice == {"a": "small", "b": "big", "c": "big"} and exact.exact
    assert exact.damage == 10.0 < greedy.damage == 16.0


@settings(max_examples=200, deadline=None)
@given(instances(), st.floats(0, 1), st.floats(0, 1))
def test_larger_budget_never_more_damage(options, x, y):
    lo, hi = sorted((x, y))
    span = max_bytes(options) - min_bytes(options)
    small = solve(options, max_bytes=min_bytes(options) + round(lo * span))
    large = solve(options, max_bytes=min_bytes(options) + round(hi * span))
    assert large.damage <= small.damage + TOL


@settings(max_examples=200, deadline=None)
@given(instances(), st.floats(0, 1))
def test_dominated_options_never_chosen(options, where):
    budget = min_bytes(options) + round(where * (max_bytes(options) - min_bytes(options)))
    for g, o in chosen(options, allocate(options, budget)).items():
        assert not any(p.bytes <= o.bytes and p.damage <= o.damage and (p.bytes, p.damage) != (o.bytes, o.damage)
                       for p in options[g])


def test_strictly_dominated_option_is_never_chosen_even_when_cheapest_per_step():
    options = {"g": [Option("a", 10, 1.0), Option("worse", 12, 1.5), Option("c", 4, 3.0)]}
    for budget in range(4, 30):
        assert allocate(options, budget)["g"] != "worse"


@settings(max_examples=200, deadline=None)
@given(instances())
def test_extreme_budgets(options):
    roomy = chosen(options, allocate(options, 10**12))
    tight = chosen(options, allocate(options, min_bytes(options)))
    for g, opts in options.items():
        least = min(o.damage for o in opts)
        assert roomy[g].damage == least
        assert roomy[g].bytes == min(o.bytes for o in opts if o.damage == least)
        smallest = min(o.bytes for o in opts)
        assert tight[g].bytes == smallest
        assert tight[g].damage == min(o.damage for o in opts if o.bytes == smallest)


@settings(max_examples=100, deadline=None)
@given(instances(integer_damage=True), st.floats(0, 1))
def test_choice_is_deterministic_under_reordering(options, where):
    budget = min_bytes(options) + round(where * (max_bytes(options) - min_bytes(options)))
    shuffled = {g: list(reversed(opts)) for g, opts in options.items()}
    assert allocate(shuffled, budget) == allocate(options, budget)


def test_equal_options_break_ties_by_format_name():
    options = {"g": [Option("z", 5, 1.0), Option("a", 5, 1.0), Option("m", 9, 0.5)]}
    assert allocate(options, 6) == {"g": "a"}
    assert smallest_within(options, 1.0) == {"g": "a"}


# ----------------------------------------------------------------------------------------- dual

@settings(max_examples=300, deadline=None)
@given(instances(integer_damage=True), st.floats(0, 1))
def test_smallest_within_matches_brute_force(options, where):
    b, d = all_choices(options)
    limit = d.min() + where * (d.max() - d.min())
    choice = smallest_within(options, limit)
    total = summary(options, choice)
    assert total["damage"] <= limit
    assert total["bytes"] == b[d <= limit].min()


@settings(max_examples=100, deadline=None)
@given(instances(), st.data())
def test_smallest_within_on_float_damages(options, data):
    """Limits half-way across gaps of more than 1e-9 between achievable damages, or the largest one,
    where summation order and the solver's 1e-12 relative tolerance cannot matter."""
    b, d = all_choices(options)
    levels = np.unique(d)
    wide = np.flatnonzero(np.diff(levels) > 1e-9)
    limits = [(levels[i] + levels[i + 1]) / 2 for i in wide] + [d.max()]
    limit = limits[data.draw(st.integers(0, len(limits) - 1))]
    total = summary(options, smallest_within(options, limit))
    assert total["damage"] <= limit + TOL
    assert total["bytes"] == b[d <= limit].min()


# ----------------------------------------------------------------------------------------- errors

def test_budget_below_minimum_is_one_line_with_the_minimum():
    options = {"a": [Option("q4", 100, 0.1), Option("q2", 60, 0.5)], "b": [Option("q4", 40, 0.2)]}
    with pytest.raises(FrugalError) as e:
        allocate(options, 99)
    assert "\n" not in str(e.value) and "99" in str(e.value) and "100 bytes" in str(e.value)
    assert allocate(options, 100) == {"a": "q2", "b": "q4"}
    with pytest.raises(FrugalError) as e:
        smallest_within(options, 0.25)
    assert "\n" not in str(e.value) and "0.3" in str(e.value)


@pytest.mark.parametrize("options, word", [
    ({"g": []}, "no options"),
    ({"g": [Option("a", 1, 0.0), Option("a", 2, 0.0)]}, "twice"),
    ({"g": [Option("a", -1, 0.0)]}, "non-negative"),
    ({"g": [Option("a", 1, math.nan)]}, "finite"),
])
def test_bad_options_are_one_line_errors(options, word):
    with pytest.raises(FrugalError, match=word) as e:
        allocate(options, 100)
    assert "\n" not in str(e.value) and "'g'" in str(e.value)


def test_summary_counts_formats_and_rejects_unknown_choices():
    options = {"a": [Option("q4", 10, 1.0), Option("q8", 20, 0.5)], "b": [Option("q4", 10, 2.0)],
               "c": [Option("q8", 20, 0.25)]}
    assert summary(options, {"a": "q8", "b": "q4", "c": "q8"}) == {"bytes": 50, "damage": 2.75,
                                                                   "formats": {"q4": 1, "q8": 2}}
    with pytest.raises(FrugalError, match="'q2'"):
        summary(options, {"a": "q2", "b": "q4", "c": "q8"})
    with pytest.raises(FrugalError, match="'c'"):
        summary(options, {"a": "q8", "b": "q4"})


# ----------------------------------------------------------------------------------------- tie groups

def llama_names(n_layers=2):
    names = []
    for i in range(n_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{x}" for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{x}" for x in ("gate_proj", "up_proj", "down_proj")]
    return names + ["lm_head"]


def test_tie_groups_of_a_dense_model():
    groups = tie_groups(llama_names())
    assert groups == {
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}": [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"],
        "model.layers.0.self_attn.o_proj": ["model.layers.0.self_attn.o_proj"],
        "model.layers.0.mlp.{gate_proj,up_proj}": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        "model.layers.0.mlp.down_proj": ["model.layers.0.mlp.down_proj"],
        "model.layers.1.self_attn.{q_proj,k_proj,v_proj}": [f"model.layers.1.self_attn.{x}_proj" for x in "qkv"],
        "model.layers.1.self_attn.o_proj": ["model.layers.1.self_attn.o_proj"],
        "model.layers.1.mlp.{gate_proj,up_proj}": ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
        "model.layers.1.mlp.down_proj": ["model.layers.1.mlp.down_proj"],
        "lm_head": ["lm_head"],
    }
    # Every layer in exactly one group; reversing the input only reverses the order inside braces.
    assert sorted(sum(groups.values(), [])) == sorted(llama_names())
    swap = {"{q_proj,k_proj,v_proj}": "{v_proj,k_proj,q_proj}", "{gate_proj,up_proj}": "{up_proj,gate_proj}"}
    assert set(tie_groups(list(reversed(llama_names())))) == {
        g.replace(*next(iter(swap.items()))).replace(*list(swap.items())[1]) for g in groups}


def test_tie_groups_of_experts():
    names = []
    for i in range(2):
        names.append(f"model.layers.{i}.self_attn.q_proj")
        names.append(f"model.layers.{i}.mlp.gate")  # the router
        for e in range(3):
            names += [f"model.layers.{i}.mlp.experts.{e}.{x}" for x in ("gate_proj", "up_proj", "down_proj")]
        names += [f"model.layers.{i}.mlp.shared_expert.{x}" for x in ("gate_proj", "up_proj", "down_proj")]
    groups = tie_groups(names)
    down = groups["model.layers.1.mlp.experts.*.down_proj"]
    assert down == [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(3)]
    # gate/up tie within an expert and each kind ties across experts: one fused w13 group per block.
    assert sorted(groups["model.layers.0.mlp.experts.*.{gate_proj,up_proj}"]) == sorted(
        f"model.layers.0.mlp.experts.{e}.{x}" for e in range(3) for x in ("gate_proj", "up_proj"))
    assert groups["model.layers.0.mlp.shared_expert.{gate_proj,up_proj}"] == [
        "model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj"]
    assert groups["model.layers.0.mlp.gate"] == ["model.layers.0.mlp.gate"]
    assert len(groups) == 2 * 6  # q_proj, router, experts' gate+up, experts' down, shared gate+up, shared down
    # Mixtral names: w1/w2/w3 per kind across experts.
    mixtral = [f"model.layers.0.block_sparse_moe.experts.{e}.w{k}" for e in range(4) for k in (1, 2, 3)]
    assert tie_groups(mixtral) == {f"model.layers.0.block_sparse_moe.experts.*.w{k}":
                                   [f"model.layers.0.block_sparse_moe.experts.{e}.w{k}" for e in range(4)]
                                   for k in (1, 2, 3)}


def test_tie_rules_are_configurable():
    names = llama_names(1)
    assert tie_groups(names, rules=[]) == {n: [n] for n in names}
    custom = tie_groups(names, rules=[("*_proj",)])
    assert custom == {"model.layers.0.self_attn.{q_proj,k_proj,v_proj,o_proj}": names[:4],
                      "model.layers.0.mlp.{gate_proj,up_proj,down_proj}": names[4:7], "lm_head": ["lm_head"]}
    with pytest.raises(FrugalError, match="tie rule 'q_proj'"):
        tie_groups(names, rules=["q_proj"])
    with pytest.raises(FrugalError, match="twice"):
        tie_groups(names + names[:1])


def test_group_options_sum_members_and_drop_missing_formats():
    per_layer = {
        "l.q_proj": [Option("q4", 100, 0.5), Option("q8", 200, 0.125), Option("q2", 50, 2.0)],
        "l.k_proj": [Option("q8", 50, 0.25), Option("q4", 25, 1.0)],
        "l.v_proj": [Option("q4", 25, 1.5), Option("q8", 50, 0.5), Option("q3", 40, 1.0)],
        "l.o_proj": [Option("q2", 10, 3.0)],
    }
    groups = tie_groups(list(per_layer))
    assert list(groups) == ["l.{q_proj,k_proj,v_proj}", "l.o_proj"]
    combined = group_options(per_layer, groups)
    assert combined == {"l.{q_proj,k_proj,v_proj}": [Option("q4", 150, 3.0), Option("q8", 300, 0.875)],
                        "l.o_proj": [Option("q2", 10, 3.0)]}
    with pytest.raises(FrugalError, match="no format") as e:
        group_options({"a.q_proj": [Option("q4", 1, 0.0)], "a.k_proj": [Option("q8", 1, 0.0)]},
                      tie_groups(["a.q_proj", "a.k_proj"]))
    assert "\n" not in str(e.value)
    with pytest.raises(FrugalError, match="'l.o_proj'"):
        group_options({k: v for k, v in per_layer.items() if k != "l.o_proj"}, groups)


# ----------------------------------------------------------------------------------------- budgets

@pytest.mark.parametrize("text, parsed", [
    ("3.5bpw", ("bpw", 3.5)),
    ("4 BPW", ("bpw", 4.0)),
    ("200MB", ("bytes", 200_000_000)),
    ("1.5GiB", ("bytes", 1_610_612_736)),
    ("1.1GB", ("bytes", 1_100_000_000)),
    (" 512 KiB ", ("bytes", 524_288)),
    ("100B", ("bytes", 100)),
    ("2e3kb", ("bytes", 2_000_000)),
])
def test_parse_budget(text, parsed):
    assert parse_budget(text) == parsed
    assert type(parse_budget(text)[1]) is type(parsed[1])


@pytest.mark.parametrize("text", ["", "200", "200 MBs", "3.5 bits", "-1GB", "0bpw", "0.2B", "GB", "1.5.2GB", "nanbpw"])
def test_parse_budget_rejects_with_one_line_naming_the_text(text):
    with pytest.raises(FrugalError) as e:
        parse_budget(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)


def test_bytes_for_bpw():
    assert bytes_for_bpw(1000, 4) == 500
    assert bytes_for_bpw(1000, 3.5) == 437  # 437.5 rounded down: the budget is never exceeded
    assert bytes_for_bpw(135_000_000, 4.25) == 71_718_750
    assert bytes_for_bpw(3, 0.1) == 0
    for bad in [(0, 4), (100, 0), (100, -1), (100, math.inf)]:
        with pytest.raises(FrugalError):
            bytes_for_bpw(*bad)


# ----------------------------------------------------------------------------------------- scale

def test_three_hundred_groups_of_fifteen_formats():
    """Sizes of a 7B-class model: runs (no timing assert), stays within budget, proves optimality and
    beats every format applied uniformly that fits."""
    rng = random.Random(0)
    options = {}
    for g in range(300):
        n = rng.randint(10**6, 5 * 10**7)
        sensitivity = rng.lognormvariate(0, 1)
        options[f"model.layers.{g // 7}.g{g}"] = [
            Option(f"b{bpw}", int(n * bpw / 8), sensitivity * n * 1e-9 * 4.0 ** -bpw * (1 + 0.1 * rng.random()))
            for bpw in np.arange(2.0, 9.5, 0.5)]
    n_weights = sum(int(o[0].bytes * 4) for o in options.values())
    budget = bytes_for_bpw(n_weights, 4.25)
    result = solve(options, max_bytes=budget)
    assert result.exact and result.bytes <= budget
    assert result.bound <= result.damage
    uniform = [summary(options, {g: fmt for g in options}) for fmt in ("b4.0", "b3.5")]
    assert all(result.damage <= u["damage"] for u in uniform if u["bytes"] <= budget)
    dual = solve(options, max_damage=result.damage)
    assert dual.exact and dual.damage <= result.damage * (1 + 1e-12) and dual.bytes <= result.bytes
