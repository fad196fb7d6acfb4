"""Automatic mixed precision: from a sensitivity analysis and a budget to per-layer recipe overrides.

Only integer candidates are allocated (the formats compressed-tensors, GGUF and ONNX exports load);
layers engines must keep on one scheme (q/k/v, gate/up, experts) are tied (frugal.analysis.allocate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from frugal.analysis.analyze import Analysis, parse_candidate
from frugal.config import LayerOverride, Recipe
from frugal.errors import FrugalError

log = logging.getLogger(__name__)


@dataclass
class Plan:
    choice: dict[str, str]  # layer -> candidate
    bytes: int  # stored bytes of the quantized layers
    predicted_kl: float  # sum of per-layer damages
    bpw: float  # bits per weight over the quantized layers, scales included

    def to_dict(self) -> dict[str, Any]:
        from collections import Counter

        return {"bytes": self.bytes, "predicted_kl": self.predicted_kl, "bpw": self.bpw,
                "count": dict(sorted(Counter(self.choice.values()).items())), "choice": self.choice}


def plan(analysis: Analysis, budget: str | None = None, max_kl: float | None = None,
         candidates: list[str] | None = None, float_bytes: int = 0, tie: bool = True, ggml: bool = False) -> Plan:
    """Choose a candidate per layer: least predicted KL within `budget` ("3.5bpw", "200MB": the whole
    checkpoint, `float_bytes` being what stays unquantized), or the smallest within `max_kl`. The
    candidates are the integer formats, or with `ggml` the GGML block types (a GGUF target)."""
    from frugal.analysis import allocate as al

    kind = (lambda c: bool(c.ggml)) if ggml else (lambda c: c.scheme is not None)
    allowed = [c for c in (candidates or analysis.candidates) if kind(parse_candidate(c))]
    if not allowed:
        raise FrugalError(f"mixed precision: no {'GGML' if ggml else 'integer'} candidate format in the analysis")
    per_layer = {ls.name: [al.Option(c, ls.bytes[c], ls.damage(c)) for c in allowed if c in ls.proxy]
                 for ls in analysis.layers}
    groups = al.tie_groups(list(per_layer), None if tie else [])
    options = al.group_options(per_layer, groups)
    n_weights = sum(ls.shape[0] * ls.shape[1] for ls in analysis.layers)
    if (budget is None) == (max_kl is None):
        raise FrugalError("mixed precision: give exactly one of --budget and --max-kl")
    if budget is not None:
        kind, value = al.parse_budget(budget)
        max_bytes = al.bytes_for_bpw(n_weights, value) if kind == "bpw" else int(value) - float_bytes
        group_choice = al.allocate(options, max_bytes)
    else:
        group_choice = al.smallest_within(options, max_kl)
    choice = {layer: group_choice[g] for g, layers in groups.items() for layer in layers}
    lookup = {ls.name: ls for ls in analysis.layers}
    total = sum(lookup[n].bytes[c] for n, c in choice.items())
    damage = sum(lookup[n].damage(c) for n, c in choice.items())
    return Plan(choice, total, damage, 8 * total / n_weights)


def apply(recipe: Recipe, p: Plan) -> Recipe:
    """The recipe with one exact-name override per layer (the scheme of its chosen candidate, float16
    scales as the plan's byte counts assume)."""
    def override(name: str, c: str) -> LayerOverride:
        cand = parse_candidate(c)
        return LayerOverride(match=name, ggml_type=cand.ggml) if cand.ggml else LayerOverride(name, cand.scheme)

    overrides = tuple(override(name, c) for name, c in sorted(p.choice.items()))
    return replace(recipe, overrides=overrides)


@torch.no_grad()
def measured_kl(reference, model, samples) -> float:
    """Mean KL(reference || model) per token on (n, seq) token ids, one sequence at a time."""
    import torch.nn.functional as F

    from frugal.evaluation.divergence import kl_sum

    total, count = 0.0, 0
    for ids in samples:
        ref = F.log_softmax(reference(ids[None], use_cache=False).logits[0].float(), dim=-1)
        lp = F.log_softmax(model(ids[None], use_cache=False).logits[0].float(), dim=-1)
        total += kl_sum(ref, lp)
        count += ids.numel()
    return max(total / count, 0.0)
