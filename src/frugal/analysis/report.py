"""Outputs of `frugal analyze`: analysis.json, a heat map (layers x formats, SVG) and terminal tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from frugal.analysis.analyze import Analysis


def heatmap_svg(a: Analysis, path: Path) -> None:
    """log10 of each layer's damage (measured KL, else c_L x proxy) per candidate; deterministic bytes."""
    import numpy as np

    from frugal.report.charts import SVG_METADATA, new_figure, plot_style

    cands = a.candidates
    grid = np.full((len(a.layers), len(cands)), np.nan)
    for i, ls in enumerate(a.layers):
        for j, c in enumerate(cands):
            if c in ls.proxy:
                grid[i, j] = math.log10(max(ls.damage(c), 1e-12))
    with plot_style():
        fig = new_figure(1.2 + 0.55 * len(cands), 1.5 + 0.09 * len(a.layers))
        ax = fig.add_subplot()
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
        ax.set_xticks(range(len(cands)), cands, rotation=45, ha="right")
        step = max(1, len(a.layers) // 40)
        ax.set_yticks(range(0, len(a.layers), step), [a.layers[i].name for i in range(0, len(a.layers), step)],
                      fontsize=6)
        ax.grid(False)
        ax.set_title("damage of quantizing one layer: log10 KL (nats/token)")
        fig.colorbar(im, ax=ax, shrink=0.6)
        fig.savefig(path, format="svg", metadata=SVG_METADATA)


def format_table(a: Analysis) -> tuple[list[str], list[tuple]]:
    """Per candidate: bits/weight over the analysed layers, total predicted damage, measured or not."""
    rows = []
    for c in a.candidates:
        have = [ls for ls in a.layers if c in ls.proxy]
        n_w = sum(ls.shape[0] * ls.shape[1] for ls in have)
        bpw = 8 * sum(ls.bytes[c] for ls in have) / max(n_w, 1)
        dmg = sum(ls.damage(c) for ls in have)
        rows.append((c, f"{bpw:.3f}", f"{dmg:.4g}", "measured" if c in a.measured else "c_L x proxy",
                     f"{a.spearman[c]:.3f}" if c in a.spearman else ("fit" if c == a.measured[0] else "")))
    return ["format", "bits/weight", "sum of layer damage", "source", "Spearman vs measured"], rows


def top_layers(a: Analysis, cand: str, n: int = 10) -> tuple[list[str], list[tuple]]:
    ranked = sorted((ls for ls in a.layers if cand in ls.proxy), key=lambda ls: -ls.damage(cand))[:n]
    return ["layer", f"KL at {cand}", "amplification c_L"], [
        (ls.name, f"{ls.damage(cand):.3g}", f"{ls.amplification:.3g}" if ls.amplification is not None else "")
        for ls in ranked]


def expert_table(a: Analysis) -> tuple[list[str], list[tuple]]:
    """Per MoE layer: its experts' routed shares of the calibration tokens (from each expert's first
    projection), the least and most routed, and how many experts no token reached."""
    by_group: dict[str, dict[str, float]] = {}
    for ls in a.layers:
        if ls.routed is not None:
            group, _, rest = ls.name.rpartition(".")[0].rpartition(".")
            by_group.setdefault(group, {}).setdefault(rest, ls.routed)  # the first projection's share
    rows = []
    for group, shares in by_group.items():
        lo, hi = min(shares, key=shares.get), max(shares, key=shares.get)
        rows.append((group, len(shares), sum(v == 0 for v in shares.values()),
                     f"{100 * shares[lo]:.1f} % (expert {lo})", f"{100 * shares[hi]:.1f} % (expert {hi})"))
    return ["MoE layer", "experts", "never routed", "least routed", "most routed"], rows


def write(a: Analysis, directory: Path) -> None:
    directory = Path(directory)
    (directory / "analysis.json").write_text(json.dumps(a.to_dict(), indent=1, sort_keys=True) + "\n")
    heatmap_svg(a, directory / "heatmap.svg")
