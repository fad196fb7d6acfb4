"""Which Hessian each layer of a block is rounded with, when some layers saw few calibration tokens or none.

A MoE expert sees only the tokens routed to it: an expert that got fewer tokens than its input width has
a rank-deficient X^T X, and one the router never picked has none. The rule (recorded per expert in
frugal.json as `tokens` and `statistics`):
- `own`: at least `in_features` routed tokens: the expert's own Hessian;
- `pooled`: fewer, but the same projection of all the layer's experts together saw enough: the pooled
  H = 2/n sum_e X_e^T X_e (the inputs an average expert of this layer reads);
- `none`: not even that: rounded without a Hessian (the method's `no_hessian` fallback, RTN for GPTQ).
A layer outside the experts that no calibration input reached (its weight is used without calling the
module, e.g. mamba's `dt_proj`) is rounded the `none` way too, with a warning naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from frugal.load.experts import ExpertLinears, is_expert_layer
from frugal.quant.gptq import Hessian

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Statistics:
    """How one layer's Hessian was obtained: its own calibration `tokens` and the `source` used."""

    tokens: int
    source: str  # "own", "pooled" or "none"


def _pools(layers: dict[str, nn.Linear], accs: dict[str, Hessian],
           groups: dict[str, ExpertLinears]) -> dict[tuple[str, str], Hessian]:
    """Per (experts group, projection): the sum of its experts' accumulators."""
    pools: dict[tuple[str, str], Hessian] = {}
    for name, lin in layers.items():
        group = is_expert_layer(name, groups)
        if group is None:
            continue
        pool = pools.setdefault((group, name.rpartition(".")[2]), Hessian(lin.in_features, lin.weight.device))
        acc = accs.get(name)
        if acc is not None:
            pool.xtx += acc.xtx
            pool.n += acc.n
    return pools


def choose_hessians(layers: dict[str, nn.Linear], accs: dict[str, Hessian], groups: dict[str, ExpertLinears]
                    ) -> tuple[dict[str, Hessian | None], dict[str, Statistics]]:
    """(accumulator per layer, None: round without one; the Statistics of every expert layer and of every
    layer that saw nothing), by the rule above."""
    pools = _pools(layers, accs, groups)
    chosen: dict[str, Hessian | None] = {}
    stats: dict[str, Statistics] = {}
    for name, lin in layers.items():
        acc = accs.get(name)
        tokens = acc.n if acc is not None else 0
        group = is_expert_layer(name, groups)
        if group is None:
            chosen[name] = acc if tokens else None
            if not tokens:
                stats[name] = Statistics(0, "none")
            continue
        pool = pools[(group, name.rpartition(".")[2])]
        if tokens >= lin.in_features:
            chosen[name], source = acc, "own"
        elif pool.n >= lin.in_features:
            chosen[name], source = pool, "pooled"
        else:
            chosen[name], source = None, "none"
        stats[name] = Statistics(tokens, source)
    _warn(stats, layers)
    return chosen, stats


def _warn(stats: dict[str, Statistics], layers: dict[str, nn.Linear]) -> None:
    """One warning per kind of fallback, naming the layers (and the routed tokens of experts)."""
    for source, what in (("pooled", "their Hessian is pooled over the layer's experts"),
                         ("none", "rounded to nearest without a Hessian")):
        names = [n for n, s in stats.items() if s.source == source]
        if not names:
            continue
        shown = ", ".join(f"{n} ({stats[n].tokens} tokens, in_features {layers[n].in_features})" for n in names[:4])
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        log.warning("%d layers saw fewer calibration tokens than their input width: %s%s; %s", len(names),
                    shown, more, what)
