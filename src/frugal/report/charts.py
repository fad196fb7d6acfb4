"""The plots and shared helpers of report.html (frugal.report.html): matplotlib figures drawn as SVG and
embedded as `data:` URIs. The same results give the same bytes: SVG ids are salted with a constant and
the date/creator metadata are left out. matplotlib is imported only inside the plotting functions, so
importing this module (and `frugal`) stays cheap. A plot that fails to draw is reported in place
(`plot_section`) instead of losing the whole report.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import logging
import math
import re
from typing import Any, Callable, Iterator

log = logging.getLogger("frugal.report.html")

# Model colours (matplotlib tab10 without its grey); the reference is always dark grey.
MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
REF_COLOR = "#4d4d4d"

# Linear-layer kinds, in the order they run inside a block: attention in blues/green, MLP in oranges.
KIND_COLORS = {"q": "#9ecae1", "k": "#4292c6", "v": "#08519c", "qkv": "#6baed6", "o": "#41ab5d",
               "gate": "#fdae6b", "up": "#f16913", "gate_up": "#fd8d3c", "down": "#a63603", "other": "#969696"}
_KIND_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv_proj": "qkv", "query_key_value": "qkv",
            "o_proj": "o", "out_proj": "o", "gate_proj": "gate", "up_proj": "up", "gate_up_proj": "gate_up",
            "down_proj": "down", "fc1": "up", "fc2": "down"}
TASK_NAMES = {"piqa": "PIQA", "hellaswag": "HellaSwag"}

_RC = {
    "svg.hashsalt": "frugal-report",  # fixed ids -> same bytes for the same results
    "svg.fonttype": "path",           # text as paths: looks the same in every browser
    "font.family": "DejaVu Sans",     # ships with matplotlib
    "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "axes.labelsize": 10,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.axisbelow": True,
}
SVG_METADATA = {"Date": None, "Creator": None}


# ---------------------------------------------------------------------------------------------
# Small helpers


# Control characters (a broken model generates them) have no glyph and are invalid in HTML: C0 shows
# as its Unicode "control picture" (\x03 -> ␃); C1 and lone surrogates as the replacement character.
_CONTROLS = {**{c: 0x2400 + c for c in range(0x20) if chr(c) not in "\t\n\r"}, 0x7F: 0x2421,
             **{c: 0xFFFD for c in (*range(0x80, 0xA0), *range(0xD800, 0xE000))}}


def esc(x: Any) -> str:
    return html.escape(str(x).translate(_CONTROLS), quote=True)


def finite(x: Any) -> float | None:
    """A finite number, or None (absent, null, NaN, inf, bool, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def models_of(results: dict) -> list[dict]:
    return [m for m in (results.get("models") or []) if isinstance(m, dict)]


def model_name(m: dict) -> str:
    return str(m.get("name", "?"))


def model_colors(models: list[dict]) -> dict[str, str]:
    """One colour per model name, the same in every plot and in the tables."""
    colors, i = {}, 0
    for m in models:
        if m.get("is_reference"):
            colors[model_name(m)] = REF_COLOR
        else:
            colors[model_name(m)] = MODEL_COLORS[i % len(MODEL_COLORS)]
            i += 1
    return colors


def _plain(s: str) -> str:
    """Text for matplotlib: a `$` must not start mathtext."""
    return str(s).translate(_CONTROLS).replace("$", r"\$")


def fmt_sig(v: float, digits: int = 3) -> str:
    """`digits` significant digits in fixed notation (0.0123, 0.500, 12.3)."""
    if v == 0:
        return "0"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def fmt_rate(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _mb(n: float) -> float:
    return n / 1e6


def not_measured(what: str, why: str = "") -> str:
    return f'<p class="nm"><strong>{esc(what)}: not measured</strong>{" — " + esc(why) if why else ""}</p>'


# ---------------------------------------------------------------------------------------------
# Figures


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def new_figure(width: float, height: float):
    """A figure on the non-interactive Agg canvas, without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def embed_svg(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata=SVG_METADATA)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/svg+xml;base64,{data}">'


def _no_data(ax, text: str = "not measured") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#888888", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (smaller x and smaller y are better), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _scatter_panel(ax, pts: list[tuple[str, float, float]], colors: dict[str, str], ref: str | None,
                   nonnegative: bool = False) -> None:
    """Labelled points, one colour per model, with the Pareto front as a staircase."""
    front = pareto_front([(x, y) for _, x, y in pts])
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="#999999", linestyle="--", linewidth=1.2, zorder=1)
    for name, x, y in pts:
        ax.scatter([x], [y], s=70, color=colors[name], marker="D" if name == ref else "o",
                   edgecolor="white", linewidth=0.8, zorder=3)
    ax.margins(x=0.12, y=0.15)
    ax.set_xlim(*ax.get_xlim())
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -0.06 * hi) if nonnegative else lo, hi)
    _label_points(ax, pts, colors)


LABEL_GAP = 0.07  # axes fraction between two label baselines (9 pt text on a ~3 inch tall axes)


def _label_points(ax, pts: list[tuple[str, float, float]], colors: dict[str, str]) -> None:
    """Name every point; a label that would overlap one already placed moves up, joined to its point."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float, float]] = []  # (left, right, y) in axes fraction
    for name, x, y in sorted(pts, key=lambda p: (p[2], p[1])):
        fx, fy = (x - x0) / ((x1 - x0) or 1), (y - y0) / ((y1 - y0) or 1)
        width = 0.0185 * len(name) + 0.01
        right_side = fx + 0.03 + width <= 1.0
        left, right = (fx + 0.03, fx + 0.03 + width) if right_side else (fx - 0.03 - width, fx - 0.03)
        ly = fy
        for _ in range(len(placed)):  # each pass clears at least the highest clash; bounded either way
            clash = [py for pl, pr, py in placed if left < pr and pl < right and abs(ly - py) < LABEL_GAP * 0.999]
            if not clash:
                break
            ly = max(clash) + LABEL_GAP
        placed.append((left, right, ly))
        arrow = dict(arrowstyle="-", color=colors[name], linewidth=0.6, shrinkA=1, shrinkB=5) if ly - fy > 0.02 else None
        ax.annotate(_plain(name), (x, y), xytext=(left if right_side else right, ly), textcoords="axes fraction",
                    ha="left" if right_side else "right", va="center", fontsize=9, color=colors[name],
                    arrowprops=arrow, zorder=4, annotation_clip=False,
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85))


def plot_pareto(models: list[dict], colors: dict[str, str], ref: str | None) -> str:
    ppl = [(model_name(m), _mb(s), p) for m in models
           if (s := finite(m.get("size_bytes"))) is not None and (p := finite(m.get("perplexity"))) is not None]
    kl = [(model_name(m), _mb(s), 0.0 if m.get("is_reference") else k) for m in models
          if (s := finite(m.get("size_bytes"))) is not None
          and ((k := finite(m.get("kl"))) is not None or m.get("is_reference"))]
    if not any(n != ref for n, _, _ in kl):
        kl = []
    if not ppl and not kl:
        return not_measured("Quality vs size", "no model has both a size and a perplexity")
    with plot_style():
        fig = new_figure(10, 3.9)
        ax1, ax2 = fig.subplots(1, 2)
        for ax, pts, ylabel, title in ((ax1, ppl, "perplexity (lower is better)", "Perplexity vs size"),
                                       (ax2, kl, "KL to reference (nats/token)", "KL divergence vs size")):
            ax.set_title(title)
            if not pts:
                _no_data(ax)
                continue
            _scatter_panel(ax, pts, colors, ref, nonnegative=ax is ax2)
            ax.set_xlabel("size of weight files (MB)")
            ax.set_ylabel(ylabel)
        cap = ("Dashed staircase: the Pareto front, models that no other model beats on both size and quality. "
               "The reference (◆) has KL 0 by definition.")
        return embed_svg(fig, "perplexity and KL divergence against model size, with the Pareto front") + \
            f'<p class="cap">{esc(cap)}</p>'


def _layer_kind(name: str) -> str:
    return _KIND_OF.get(name.rsplit(".", 1)[-1], "other")


def _layer_key(name: str) -> tuple[int, int, int, str]:
    """Sort key: block index (layers outside blocks last), then kind in execution order."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    kinds = list(KIND_COLORS)
    return (0 if m else 1, int(m.group(1)) if m else 0, kinds.index(_layer_kind(name)), name)


def layer_series(layer_errors: Any) -> tuple[str, list[tuple[str, float]]] | None:
    """(metric, [(layer, error)]) ordered by layer: output_rel_error when every layer has it, else
    weight_rel_error (mixing the two on one axis would mislead)."""
    if not isinstance(layer_errors, dict) or not layer_errors:
        return None
    names = sorted((n for n, r in layer_errors.items() if isinstance(r, dict)), key=_layer_key)
    for metric in ("output_rel_error", "weight_rel_error"):
        vals = [(n, finite(layer_errors[n].get(metric))) for n in names]
        if vals and all(v is not None for _, v in vals):
            return metric, vals
    return None


def _layer_axis(ax, series: list[tuple[str, float]]) -> None:
    """Bars grouped by block (a gap between blocks), coloured by kind."""
    xs, blocks, x = [], [], 0
    last = None
    for name, _ in series:
        key = _layer_key(name)
        block = key[1] if key[0] == 0 else None
        if xs and block != last:
            x += 1
        xs.append(x)
        blocks.append(block)
        last, x = block, x + 1
    ax.bar(xs, [v for _, v in series], width=0.85, color=[KIND_COLORS[_layer_kind(n)] for n, _ in series])
    if len(series) <= 40:  # a label per bar: "3.q", or the bare name outside blocks ("lm_head")
        labels = [n.rsplit(".", 1)[-1] if b is None else f"{b}.{_layer_kind(n)}" for (n, _), b in zip(series, blocks)]
        ax.set_xticks(xs, labels, rotation=0 if len(series) <= 16 else 90, fontsize=8)
        ax.set_xlabel("layer (block.kind)")
    else:
        centers: dict[Any, list[int]] = {}
        for xi, b in zip(xs, blocks):
            centers.setdefault(b, []).append(xi)
        step = max(1, len(centers) // 15)
        ticks = [(sum(v) / len(v), "other" if b is None else str(b)) for i, (b, v) in enumerate(centers.items())
                 if i % step == 0 or b is None]
        ax.set_xticks([t for t, _ in ticks], [lbl for _, lbl in ticks])
        ax.set_xlabel("block index (bars within a block: layers in execution order)")
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.grid(axis="x", visible=False)


def plot_layer_errors(models: list[dict], colors: dict[str, str]) -> str:
    series = [(model_name(m), s) for m in models if not m.get("is_reference") and (s := layer_series(m.get("layer_errors")))]
    if not series:
        return not_measured("Per-layer error", "no compressed model carries layer errors (frugal.json from "
                                                "`frugal compress`)")
    metrics = {metric for _, (metric, _) in series}
    with plot_style():
        fig = new_figure(10, 1.0 + 2.6 * len(series))
        axes = fig.subplots(len(series), 1, sharey=len(metrics) == 1, squeeze=False)[:, 0]
        for ax, (name, (metric, vals)) in zip(axes, series):
            _layer_axis(ax, vals)
            ax.set_title(_plain(name), color=colors[name], loc="left")
            ax.set_ylabel(metric.replace("_rel_error", " rel. error"))
        kinds = [k for k in KIND_COLORS if any(_layer_kind(n) == k for _, (_, v) in series for n, _ in v)]
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in kinds], loc="outside upper center",
                   ncols=len(kinds), title="layer kind")
        notes = {"output_rel_error": "output rel. error = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration inputs",
                 "weight_rel_error": "weight rel. error = ‖W − Q‖ / ‖W‖ (for a model whose output error was not "
                                     "recorded for every layer)"}
        cap = "; ".join(notes[k] for k in sorted(metrics, key=list(notes).index))
        return embed_svg(fig, "relative error of every quantized linear layer") + f'<p class="cap">{esc(cap)}.</p>'


def _block_index(label: Any, default: int) -> int:
    m = re.search(r"(\d+)\s*$", str(label))
    return int(m.group(1)) if m else default


def plot_block_errors(models: list[dict], colors: dict[str, str]) -> str:
    lines = []
    for m in models:
        pts = [(_block_index(b.get("block"), i), v) for i, b in enumerate(m.get("block_errors") or [])
               if isinstance(b, dict) and (v := finite(b.get("rel_error"))) is not None]
        if pts:
            lines.append((model_name(m), sorted(pts)))
    if not lines:
        return not_measured("Per-block error", "no model has block errors (they need a reference model)")
    with plot_style():
        fig = new_figure(10, 3.4)
        ax = fig.subplots()
        for name, pts in lines:
            ax.plot(*zip(*pts), marker="o", markersize=4, linewidth=1.8, color=colors[name], label=_plain(name))
        ax.set_title("Relative output error of each block")
        ax.set_xlabel("block index")
        ax.set_ylabel("relative output error")
        ax.set_ylim(bottom=0)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left")
        cap = ("‖B(x) − B_ref(x)‖ / ‖B_ref(x)‖ with x the reference's input to the block, so errors do not "
               "accumulate from block to block.")
        return embed_svg(fig, "relative output error of each block, one line per model") + f'<p class="cap">{esc(cap)}</p>'



def spread(x: Any, scale: float = 1.0) -> tuple[float, float, float] | None:
    """(median, min, max) from {"median","min","max"} or a bare number; None when absent."""
    if isinstance(x, dict):
        med = finite(x.get("median"))
        if med is None:
            return None
        lo, hi = finite(x.get("min")), finite(x.get("max"))
        return med * scale, (med if lo is None else lo) * scale, (med if hi is None else hi) * scale
    v = finite(x)
    return None if v is None else (v * scale, v * scale, v * scale)


SPEED_PANELS = (  # (title, key, scale, unit)
    ("Prefill (higher is better)", "prefill_tok_s", 1.0, "tokens/s"),
    ("Decode (higher is better)", "decode_tok_s", 1.0, "tokens/s"),
    ("Time to first token (lower is better)", "ttft_s", 1e3, "ms"),
    ("Peak RSS (lower is better)", "peak_rss_bytes", 1e-6, "MB"),
)


def _bars(ax, rows: list[tuple[str, tuple[float, float, float]]], colors: dict[str, str]) -> None:
    """Median bars with min-max whiskers, the median written above the whisker."""
    xs = range(len(rows))
    med = [r[1][0] for r in rows]
    spreads = [s for _, s in rows]
    err = [[max(0.0, m - lo) for m, lo, _ in spreads], [max(0.0, hi - m) for m, _, hi in spreads]]
    ax.bar(xs, med, color=[colors[n] for n, _ in rows], width=0.65,
           yerr=err if any(any(e) for e in err) else None, capsize=4, ecolor="#333333")
    for x, (_, (m, _, hi)) in zip(xs, rows):
        ax.annotate(fmt_rate(m), (x, max(m, hi)), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8)
    long = max(len(n) for n, _ in rows) > 10 or len(rows) > 4
    ax.set_xticks(list(xs), [_plain(n) for n, _ in rows], rotation=25 if long else 0, ha="right" if long else "center")
    ax.margins(y=0.15)
    ax.grid(axis="x", visible=False)


def plot_speed(models: list[dict], colors: dict[str, str]) -> str:
    panels = []
    for title, key, scale, unit in SPEED_PANELS:
        rows = [(model_name(m), s) for m in models if (s := spread(dig(m, "speed", key), scale)) is not None]
        panels.append((title, unit, rows))
    if not any(rows for _, _, rows in panels):
        return not_measured("Speed and memory", "run `frugal eval --speed`")
    with plot_style():
        fig = new_figure(10, 6.6)
        fig.get_layout_engine().set(h_pad=0.12)
        for ax, (title, unit, rows) in zip(fig.subplots(2, 2).flat, panels):
            ax.set_title(title)
            if rows:
                _bars(ax, rows, colors)
                ax.set_ylabel(unit)
            else:
                _no_data(ax)
        cap = "Bars: median over the repeats; whiskers: min–max. Peak RSS is measured in a fresh process per model."
        return embed_svg(fig, "prefill and decode speed, time to first token and peak memory per model") + \
            f'<p class="cap">{esc(cap)}</p>'


def plot_section(draw: Callable[[], str], what: str) -> str:
    """A plot, or a note saying why it is missing: a failed plot must not lose the whole report."""
    try:
        return draw()
    except ImportError as exc:
        return f'<p class="nm"><strong>{esc(what)}: plot unavailable</strong> — {esc(exc)}</p>'
    except Exception as exc:  # noqa: BLE001 - the other sections and results.json still matter
        log.warning("report.html: could not draw %s: %s", what, exc)
        return (f'<p class="nm"><strong>{esc(what)}: could not be drawn</strong> — '
                f'{esc(type(exc).__name__)}: {esc(exc)}</p>')
