"""Mixed precision allocation: one format per tie group, least predicted damage within a budget.

Each group offers options (format, bytes, damage); damage is assumed additive across groups. Choosing
one option per group to minimise summed damage under a byte budget is the multiple-choice knapsack
problem. `solve` answers it exactly in three steps:

1. **LP relaxation.** Dominated options are dropped; each group's remaining (bytes, damage) points are
   reduced to their lower convex hull. Taking hull steps in order of damage saved per byte, while they
   fit, solves the LP relaxation; the first step that does not fit (the split) gives the multiplier λ
   and the lower bound LB = Σ_g min_j (d_gj + λ·b_gj) − λ·budget.
2. **Incumbent.** The whole steps taken, then any later steps that still fit, then the best single
   upgrades to non-hull options that fit the leftover bytes. Its damage UB is within the split step's
   damage saving of the optimum.
3. **Exact search.** An option whose reduced cost rc = d + λ·b − min_g(d + λ·b) exceeds UB − LB cannot
   be in any better solution, so most groups are fixed at once; a Pareto dynamic program over (bytes,
   damage) of the remaining groups, pruned by accumulated reduced cost, finds the optimum.

If the program would exceed `max_states` states it stops and the incumbent is returned with
`exact=False`; `Allocation.bound` still proves how far it can be from the optimum (never more than
the split step's damage saving). Typical instances (300 groups × 15 formats) are solved exactly in
milliseconds. The dual problem (fewest bytes within a damage limit) runs the same code with bytes and
damage swapped.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Sequence

import numpy as np

from frugal.errors import FrugalError

log = logging.getLogger(__name__)

# Sibling names engines require to share one scheme. A pattern with several dotted components matches
# that many consecutive components of a name; its last component is the one that varies.
DEFAULT_TIES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # one attention block's q/k/v (fused qkv in vLLM)
    ("gate_proj", "up_proj"),  # one MLP's gate/up (fused gate_up)
    ("experts.[0-9]*",),  # one MoE layer's experts, per kind (with gate/up: all experts' gate+up)
)
MAX_STATES = 200_000


@dataclass(frozen=True)
class Option:
    fmt: str
    bytes: int
    damage: float


@dataclass(frozen=True)
class Allocation:
    """A choice per group, its totals, and a lower bound on the optimum of the minimised quantity
    (damage under a byte budget; bytes under a damage limit)."""

    choice: dict[str, str]
    bytes: int
    damage: float
    bound: float
    exact: bool


# ----------------------------------------------------------------------------------------- tie groups

def tie_groups(layer_names: list[str], rules: Sequence[tuple[str, ...]] | None = None) -> dict[str, list[str]]:
    """Group layers that must share one format. Layers differing only in one component matched by
    the same rule are tied (transitively); every other layer is its own group. Groups keep the order
    of `layer_names`; `rules=[]` disables tying."""
    rules = DEFAULT_TIES if rules is None else rules
    _check_rules(rules)
    if len(set(layer_names)) != len(layer_names):
        dup = next(n for n in layer_names if layer_names.count(n) > 1)
        raise FrugalError(f"layer {dup!r} is listed twice")
    parent = list(range(len(layer_names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with_key: dict[tuple, int] = {}
    for i, name in enumerate(layer_names):
        for key in _tie_keys(name.split("."), rules):
            j = first_with_key.setdefault(key, i)
            parent[root(i)] = root(j)
    members: dict[int, list[str]] = {}
    for i, name in enumerate(layer_names):
        members.setdefault(root(i), []).append(name)
    groups: dict[str, list[str]] = {}
    for names in sorted(members.values(), key=lambda ns: layer_names.index(ns[0])):
        name, k = _group_name(names), 2
        while name in groups:
            name, k = f"{_group_name(names)}#{k}", k + 1
        groups[name] = names
    return groups


def _check_rules(rules) -> None:
    for rule in rules:
        if isinstance(rule, str) or not rule or not all(isinstance(p, str) and p.strip(".") for p in rule):
            raise FrugalError(f"tie rule {rule!r}: expected a tuple of layer-name patterns, e.g. ('q_proj', 'k_proj')")


def _tie_keys(parts: list[str], rules) -> set[tuple]:
    """(rule, components before, components after) for every place a rule pattern matches."""
    keys = set()
    for r, rule in enumerate(rules):
        for pattern in rule:
            pat = pattern.split(".")
            for i in range(len(parts) - len(pat) + 1):
                if all(fnmatchcase(parts[i + t], p) for t, p in enumerate(pat)):
                    v = i + len(pat) - 1
                    keys.add((r, tuple(parts[:v]), tuple(parts[v + 1:])))
    return keys


def _group_name(names: list[str]) -> str:
    """The members' common name with each varying component written `{a,b}` (`*` for indices)."""
    if len(names) == 1:
        return names[0]
    split = [n.split(".") for n in names]
    if len({len(s) for s in split}) != 1:
        return "{" + ",".join(names) + "}"
    out = []
    for column in zip(*split):
        values = list(dict.fromkeys(column))
        if len(values) == 1:
            out.append(values[0])
        elif all(v.isdigit() for v in values):
            out.append("*")
        else:
            out.append("{" + ",".join(values) + "}")
    return ".".join(out)


def group_options(per_layer: dict[str, list[Option]], groups: dict[str, list[str]]) -> dict[str, list[Option]]:
    """Per-group options: the formats every member offers, with the members' bytes and damage summed."""
    result = {}
    for group, members in groups.items():
        missing = [m for m in members if m not in per_layer]
        if missing:
            raise FrugalError(f"group {group!r}: no options measured for layer {missing[0]!r}")
        by_layer = [_by_format(f"layer {m!r}", per_layer[m]) for m in members]
        common = [f for f in by_layer[0] if all(f in opts for opts in by_layer[1:])]
        if not common:
            raise FrugalError(f"group {group!r}: no format is available for all of its {len(members)} layers")
        result[group] = [Option(f, sum(o[f].bytes for o in by_layer), math.fsum(o[f].damage for o in by_layer))
                         for f in common]
    return result


def _by_format(where: str, options: list[Option]) -> dict[str, Option]:
    out: dict[str, Option] = {}
    for o in options:
        if o.fmt in out:
            raise FrugalError(f"{where}: format {o.fmt!r} is listed twice")
        out[o.fmt] = o
    return out


# ----------------------------------------------------------------------------------------- allocation

def allocate(options: dict[str, list[Option]], max_bytes: int) -> dict[str, str]:
    """Format per group minimising summed damage with summed bytes <= max_bytes."""
    return solve(options, max_bytes=max_bytes).choice


def smallest_within(options: dict[str, list[Option]], max_damage: float) -> dict[str, str]:
    """Format per group minimising summed bytes with summed damage <= max_damage (met to within
    1e-12 of the damage scale, since float sums depend on their order)."""
    return solve(options, max_damage=max_damage).choice


def solve(options: dict[str, list[Option]], *, max_bytes: int | None = None, max_damage: float | None = None,
          max_states: int = MAX_STATES) -> Allocation:
    """Exactly one of `max_bytes` (minimise damage) or `max_damage` (minimise bytes)."""
    if (max_bytes is None) == (max_damage is None):
        raise ValueError("give exactly one of max_bytes and max_damage")
    names = list(options)
    checked = [_by_format(f"group {g!r}", _checked(g, options[g])) for g in names]
    if max_bytes is not None:
        cap, tol_w = math.floor(max_bytes), 0.0
        points = [[(o.bytes, o.damage, f) for f, o in opts.items()] for opts in checked]
    else:
        if not math.isfinite(max_damage):
            raise FrugalError(f"max damage {max_damage}: must be a finite number")
        cap = float(max_damage)
        # Summed damages differ in their last bits with the order of summation.
        tol_w = 1e-12 * (abs(cap) + sum(max(abs(o.damage) for o in opts.values()) for opts in checked))
        points = [[(o.damage, o.bytes, f) for f, o in opts.items()] for opts in checked]
    fronts = [_pareto(p) for p in points]
    least = math.fsum(f[0][0] for f in fronts)
    if least > cap + tol_w:
        if max_bytes is not None:
            raise FrugalError(f"budget of {cap} bytes is below the smallest achievable size, "
                              f"{int(least)} bytes (every group at its smallest format)")
        raise FrugalError(f"max damage {max_damage:g} is below the least achievable damage, {least:g} "
                          f"(every group at its least-damage format)")
    picks, bound, exact = _solve(fronts, cap, tol_w, max_states)
    choice = {g: fronts[i][picks[i]][2] for i, g in enumerate(names)}
    total = summary(options, choice)
    if not exact:
        what = "damage" if max_bytes is not None else "bytes"
        got = total["damage"] if max_bytes is not None else total["bytes"]
        log.warning("allocation not proven optimal (exact search stopped, max_states=%d): %s %g, optimum >= %g",
                    max_states, what, got, bound)
    return Allocation(choice, total["bytes"], total["damage"], float(bound), exact)


def _checked(group: str, options: list[Option]) -> list[Option]:
    if not options:
        raise FrugalError(f"group {group!r} has no options")
    for o in options:
        if int(o.bytes) != o.bytes or o.bytes < 0:
            raise FrugalError(f"group {group!r}, format {o.fmt!r}: bytes must be a non-negative integer, got {o.bytes}")
        if not math.isfinite(o.damage):
            raise FrugalError(f"group {group!r}, format {o.fmt!r}: damage must be finite, got {o.damage}")
    return options


def _pareto(points: list[tuple]) -> list[tuple]:
    """Non-dominated (weight, cost, fmt) points, weight rising and cost strictly falling. Of options
    equal in both, the first format by name is kept."""
    front = []
    for p in sorted(points, key=lambda p: (p[0], p[1], p[2])):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


def _hull(front: list[tuple]) -> list[int]:
    """Indices of the lower convex hull of a Pareto front (collinear points kept)."""
    hull: list[int] = []
    for i, (w, c, _) in enumerate(front):
        while len(hull) >= 2:
            (w0, c0, _), (w1, c1, _) = front[hull[-2]], front[hull[-1]]
            if (w1 - w0) * (c - c0) - (c1 - c0) * (w - w0) < 0:  # hull[-1] lies above the chord
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _solve(fronts: list[list[tuple]], cap: float, tol_w: float, max_states: int) -> tuple[list[int], float, bool]:
    """Pareto indices minimising summed cost with summed weight <= cap, a lower bound on that
    minimum, and whether the result is proven optimal."""
    cur = [0] * len(fronts)
    used = math.fsum(f[0][0] for f in fronts)
    steps = []  # (-slope, group, position on hull, pareto index from, pareto index to)
    for g, front in enumerate(fronts):
        hull, slope_prev = _hull(front), math.inf
        for k in range(1, len(hull)):
            (w0, c0, _), (w1, c1, _) = front[hull[k - 1]], front[hull[k]]
            slope_prev = min(slope_prev, (c0 - c1) / (w1 - w0))  # clamp rounding: slopes never rise
            steps.append((-slope_prev, g, k, hull[k - 1], hull[k]))
    steps.sort()
    # 1. LP relaxation: whole hull steps by damage saved per byte until one does not fit.
    split = None
    for n, (neg_slope, g, _, a, b) in enumerate(steps):
        dw = fronts[g][b][0] - fronts[g][a][0]
        if used + dw > cap + tol_w:
            split = n
            break
        used += dw
        cur[g] = b
    if split is None:  # every group at its least-cost option: optimal
        return cur, math.fsum(f[-1][1] for f in fronts), True
    lam = -steps[split][0]
    mins = [min(c + lam * w for w, c, _ in front) for front in fronts]
    if not all(math.isfinite(m) for m in mins) or not math.isfinite(lam * cap):
        # A step of almost no weight (damages a few ulps apart) overflows the slope. Any multiplier
        # >= 0 gives a valid bound; 0 gives the unconstrained optimum.
        lam = 0.0
        mins = [min(c for _, c, _ in front) for front in fronts]
    lower = math.fsum(mins) - lam * cap
    # 2. Incumbent: later steps that still fit, then single upgrades to any Pareto option.
    for neg_slope, g, _, a, b in steps[split:]:
        dw = fronts[g][b][0] - fronts[g][a][0]
        if cur[g] == a and used + dw <= cap + tol_w:
            used += dw
            cur[g] = b
    while True:
        best = None  # (gain, -extra weight, -group, option)
        for g, front in enumerate(fronts):
            w_now, c_now, _ = front[cur[g]]
            for j in range(cur[g] + 1, len(front)):
                extra = front[j][0] - w_now
                if used + extra > cap + tol_w:
                    break
                cand = (c_now - front[j][1], -extra, -g, j)
                best = cand if best is None or cand > best else best
        if best is None:
            break
        used += -best[1]
        cur[-best[2]] = best[3]
    upper = math.fsum(f[cur[g]][1] for g, f in enumerate(fronts))
    scale = math.fsum(max(abs(c) for _, c, _ in f) for f in fronts) + lam * abs(cap)
    tol = 1e-9 * scale + 1e-300
    if upper - lower <= tol:
        return cur, lower, True
    # 3. Exact search over the options whose reduced cost leaves room to beat the incumbent.
    found = _pareto_search(fronts, cap, tol_w, lam, mins, upper - lower + tol, max_states)
    if found is None:
        return cur, lower, False
    picks, cost, weight = found
    if (cost, weight) < (upper, used):
        return picks, lower, True
    return cur, lower, True


def _pareto_search(fronts, cap, tol_w, lam, mins, room, max_states):
    """Dynamic program over (weight, cost) states of the groups with more than one option of reduced
    cost <= room. Returns (picks, cost, weight) of the best, or None past `max_states` states."""
    picks, core = [0] * len(fronts), []
    base_w, base_c = [], []
    for g, front in enumerate(fronts):
        keep = [j for j, (w, c, _) in enumerate(front) if c + lam * w - mins[g] <= room]
        if len(keep) == 1:
            picks[g] = keep[0]
            base_w.append(front[keep[0]][0])
            base_c.append(front[keep[0]][1])
        else:
            core.append((g, keep))
    # Least weight still to come after each core group, so infeasible states are dropped early.
    rest = [0.0] * (len(core) + 1)
    for n in range(len(core) - 1, -1, -1):
        g, keep = core[n]
        rest[n] = rest[n + 1] + fronts[g][keep[0]][0]
    W = np.array([math.fsum(base_w)], dtype=float)
    C = np.array([math.fsum(base_c)], dtype=float)
    R = np.zeros(1)  # accumulated reduced cost
    back = []
    for n, (g, keep) in enumerate(core):
        w = np.array([fronts[g][j][0] for j in keep], dtype=float)
        c = np.array([fronts[g][j][1] for j in keep], dtype=float)
        rc = c + lam * w - mins[g]
        W2, C2, R2 = (W[:, None] + w).ravel(), (C[:, None] + c).ravel(), (R[:, None] + rc).ravel()
        ok = np.flatnonzero((W2 + rest[n + 1] <= cap + tol_w) & (R2 <= room))
        order = ok[np.lexsort((C2[ok], W2[ok]))]  # by weight, then cost; stable, so ties are deterministic
        cs = C2[order]
        prev_min = np.concatenate(([np.inf], np.minimum.accumulate(cs)[:-1]))
        order = order[cs < prev_min]
        if len(order) > max_states:
            return None
        if len(order) == 0:  # only reachable through rounding; the incumbent stands
            return None
        back.append((order // len(keep), np.asarray(keep)[order % len(keep)]))
        W, C, R = W2[order], C2[order], R2[order]
    s = len(W) - 1  # the Pareto front's last state has the least cost (and least weight for it)
    cost, weight = float(C[s]), float(W[s])
    for n in range(len(core) - 1, -1, -1):
        parent, option = back[n]
        picks[core[n][0]] = int(option[s])
        s = int(parent[s])
    cost = math.fsum(fronts[g][j][1] for g, j in enumerate(picks))
    weight = math.fsum(fronts[g][j][0] for g, j in enumerate(picks))
    return picks, cost, weight


def summary(options: dict[str, list[Option]], choice: dict[str, str]) -> dict:
    """Total bytes, total damage and the number of groups per format of a choice."""
    if set(choice) != set(options):
        extra = sorted(set(choice) ^ set(options))
        raise FrugalError(f"choice and options differ in group {extra[0]!r}")
    chosen = []
    for g, fmt in choice.items():
        match = [o for o in options[g] if o.fmt == fmt]
        if not match:
            raise FrugalError(f"group {g!r}: format {fmt!r} is not one of its options")
        chosen.append(match[0])
    counts: dict[str, int] = {}
    for o in chosen:
        counts[o.fmt] = counts.get(o.fmt, 0) + 1
    return {"bytes": sum(int(o.bytes) for o in chosen), "damage": math.fsum(o.damage for o in chosen),
            "formats": dict(sorted(counts.items()))}


# ----------------------------------------------------------------------------------------- budgets

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*")


def bytes_for_bpw(n_weights: int, bpw: float) -> int:
    """Bytes of `n_weights` weights at `bpw` bits each (codes, scales and zero points together),
    rounded down so the budget is never exceeded."""
    if n_weights <= 0 or not (math.isfinite(bpw) and bpw > 0):
        raise FrugalError(f"{bpw} bits per weight over {n_weights} weights: both must be positive")
    return math.floor(Fraction(n_weights) * Fraction(repr(float(bpw))) / 8)


def parse_budget(text: str) -> tuple[str, int] | tuple[str, float]:
    """'3.5bpw' -> ('bpw', 3.5); '200MB' -> ('bytes', 200_000_000); '1.5GiB' -> ('bytes', 1610612736).
    Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024), bpw; any case."""
    hint = "expected a size such as '3.5bpw', '200MB' or '1.5GiB'"
    m = _BUDGET.fullmatch(text) if isinstance(text, str) else None
    unit = m.group(2).lower() if m else None
    if m is None or (unit != "bpw" and unit not in _UNITS):
        raise FrugalError(f"budget {text!r}: {hint}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise FrugalError(f"budget {text!r}: {hint}") from None
    if unit == "bpw":
        if not (number > 0 and number.is_finite()):
            raise FrugalError(f"budget {text!r}: bits per weight must be positive")
        return "bpw", float(number)
    size = math.floor(number * _UNITS[unit])
    if size < 1:
        raise FrugalError(f"budget {text!r}: must be at least one byte")
    return "bytes", size
