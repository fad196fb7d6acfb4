"""report.html: one self-contained page from results.json (docs/results-schema.md).

No external assets and no JavaScript: inline CSS, and plots drawn with matplotlib as SVG embedded
as `data:` URIs (each SVG stays its own document, so element ids of different plots cannot clash).
The same results give the same bytes: SVG ids are salted with a constant and the date/creator
metadata are left out. matplotlib is imported only inside the plotting functions, so importing this
module (and `frugal`) stays cheap.

Every section degrades on its own: a metric nobody measured is a "not measured" note rather than an
empty plot, and a plot that fails to draw is reported in place instead of losing the whole report.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from frugal.atomic import write_text_atomic
from frugal.report.table import fmt_bytes

log = logging.getLogger(__name__)

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
_SVG_METADATA = {"Date": None, "Creator": None}


# ---------------------------------------------------------------------------------------------
# Small helpers


# Control characters (a broken model generates them) have no glyph and are invalid in HTML: C0 shows
# as its Unicode "control picture" (\x03 -> ␃); C1 and lone surrogates as the replacement character.
_CONTROLS = {**{c: 0x2400 + c for c in range(0x20) if chr(c) not in "\t\n\r"}, 0x7F: 0x2421,
             **{c: 0xFFFD for c in (*range(0x80, 0xA0), *range(0xD800, 0xE000))}}


def _e(x: Any) -> str:
    return html.escape(str(x).translate(_CONTROLS), quote=True)


def _num(x: Any) -> float | None:
    """A finite number, or None (absent, null, NaN, inf, bool, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _models(results: dict) -> list[dict]:
    return [m for m in (results.get("models") or []) if isinstance(m, dict)]


def _name(m: dict) -> str:
    return str(m.get("name", "?"))


def model_colors(models: list[dict]) -> dict[str, str]:
    """One colour per model name, the same in every plot and in the tables."""
    colors, i = {}, 0
    for m in models:
        if m.get("is_reference"):
            colors[_name(m)] = REF_COLOR
        else:
            colors[_name(m)] = MODEL_COLORS[i % len(MODEL_COLORS)]
            i += 1
    return colors


def _plain(s: str) -> str:
    """Text for matplotlib: a `$` must not start mathtext."""
    return str(s).translate(_CONTROLS).replace("$", r"\$")


def _sig(v: float, digits: int = 3) -> str:
    """`digits` significant digits in fixed notation (0.0123, 0.500, 12.3)."""
    if v == 0:
        return "0"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def _rate(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _mb(n: float) -> float:
    return n / 1e6


def _not_measured(what: str, why: str = "") -> str:
    return f'<p class="nm"><strong>{_e(what)}: not measured</strong>{" — " + _e(why) if why else ""}</p>'


# ---------------------------------------------------------------------------------------------
# Figures


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def _figure(width: float, height: float):
    """A figure on the non-interactive Agg canvas, without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _embed(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata=_SVG_METADATA)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/svg+xml;base64,{data}">'


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
    ppl = [(_name(m), _mb(s), p) for m in models
           if (s := _num(m.get("size_bytes"))) is not None and (p := _num(m.get("perplexity"))) is not None]
    kl = [(_name(m), _mb(s), 0.0 if m.get("is_reference") else k) for m in models
          if (s := _num(m.get("size_bytes"))) is not None
          and ((k := _num(m.get("kl"))) is not None or m.get("is_reference"))]
    if not any(n != ref for n, _, _ in kl):
        kl = []
    if not ppl and not kl:
        return _not_measured("Quality vs size", "no model has both a size and a perplexity")
    with _style():
        fig = _figure(10, 3.9)
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
        return _embed(fig, "perplexity and KL divergence against model size, with the Pareto front") + \
            f'<p class="cap">{_e(cap)}</p>'


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
        vals = [(n, _num(layer_errors[n].get(metric))) for n in names]
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
    series = [(_name(m), s) for m in models if not m.get("is_reference") and (s := layer_series(m.get("layer_errors")))]
    if not series:
        return _not_measured("Per-layer error", "no compressed model carries layer errors (frugal.json from "
                                                "`frugal compress`)")
    metrics = {metric for _, (metric, _) in series}
    with _style():
        fig = _figure(10, 1.0 + 2.6 * len(series))
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
        return _embed(fig, "relative error of every quantized linear layer") + f'<p class="cap">{_e(cap)}.</p>'


def _block_index(label: Any, default: int) -> int:
    m = re.search(r"(\d+)\s*$", str(label))
    return int(m.group(1)) if m else default


def plot_block_errors(models: list[dict], colors: dict[str, str]) -> str:
    lines = []
    for m in models:
        pts = [(_block_index(b.get("block"), i), v) for i, b in enumerate(m.get("block_errors") or [])
               if isinstance(b, dict) and (v := _num(b.get("rel_error"))) is not None]
        if pts:
            lines.append((_name(m), sorted(pts)))
    if not lines:
        return _not_measured("Per-block error", "no model has block errors (they need a reference model)")
    with _style():
        fig = _figure(10, 3.4)
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
        return _embed(fig, "relative output error of each block, one line per model") + f'<p class="cap">{_e(cap)}</p>'



def _spread(x: Any, scale: float = 1.0) -> tuple[float, float, float] | None:
    """(median, min, max) from {"median","min","max"} or a bare number; None when absent."""
    if isinstance(x, dict):
        med = _num(x.get("median"))
        if med is None:
            return None
        lo, hi = _num(x.get("min")), _num(x.get("max"))
        return med * scale, (med if lo is None else lo) * scale, (med if hi is None else hi) * scale
    v = _num(x)
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
        ax.annotate(_rate(m), (x, max(m, hi)), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8)
    long = max(len(n) for n, _ in rows) > 10 or len(rows) > 4
    ax.set_xticks(list(xs), [_plain(n) for n, _ in rows], rotation=25 if long else 0, ha="right" if long else "center")
    ax.margins(y=0.15)
    ax.grid(axis="x", visible=False)


def plot_speed(models: list[dict], colors: dict[str, str]) -> str:
    panels = []
    for title, key, scale, unit in SPEED_PANELS:
        rows = [(_name(m), s) for m in models if (s := _spread(_get(m, "speed", key), scale)) is not None]
        panels.append((title, unit, rows))
    if not any(rows for _, _, rows in panels):
        return _not_measured("Speed and memory", "run `frugal eval --speed`")
    with _style():
        fig = _figure(10, 6.6)
        fig.get_layout_engine().set(h_pad=0.12)
        for ax, (title, unit, rows) in zip(fig.subplots(2, 2).flat, panels):
            ax.set_title(title)
            if rows:
                _bars(ax, rows, colors)
                ax.set_ylabel(unit)
            else:
                _no_data(ax)
        cap = "Bars: median over the repeats; whiskers: min–max. Peak RSS is measured in a fresh process per model."
        return _embed(fig, "prefill and decode speed, time to first token and peak memory per model") + \
            f'<p class="cap">{_e(cap)}</p>'


def _plot_section(draw: Callable[[], str], what: str) -> str:
    """A plot, or a note saying why it is missing: a failed plot must not lose the whole report."""
    try:
        return draw()
    except ImportError as exc:
        return f'<p class="nm"><strong>{_e(what)}: plot unavailable</strong> — {_e(exc)}</p>'
    except Exception as exc:  # noqa: BLE001 - the other sections and results.json still matter
        log.warning("report.html: could not draw %s: %s", what, exc)
        return (f'<p class="nm"><strong>{_e(what)}: could not be drawn</strong> — '
                f'{_e(type(exc).__name__)}: {_e(exc)}</p>')


# ---------------------------------------------------------------------------------------------
# Header and tables


def _facts(results: dict) -> list[tuple[str, str]]:
    """(label, value) for the header: what every number in the report was measured on."""
    proto = results.get("protocol") if isinstance(results.get("protocol"), dict) else {}
    ppl, tasks, speed = proto.get("perplexity"), proto.get("tasks"), proto.get("speed")
    nm = "not measured"
    facts = [("Reference", results.get("reference") or "none")]
    if isinstance(ppl, dict):
        seq = _num(ppl.get("seq_len"))
        window = f"{seq:.0f} tokens, {'BOS prepended' if ppl.get('bos') else 'no BOS'}" if seq else "?"
        scored = _count(ppl.get("scored_tokens"))
        if _num(ppl.get("max_tokens")):
            scored += f" (of the first {_count(ppl.get('max_tokens'))})"
        facts += [("Text", ppl.get("text") or "?"), ("Window", window), ("Tokens scored", scored)]
    else:
        facts += [("Text", nm), ("Window", nm), ("Tokens scored", nm)]
    if isinstance(tasks, dict) and tasks:
        facts.append(("Tasks", ", ".join(f"{TASK_NAMES.get(t, t)} ({_task_items(t, v, results)})"
                                         for t, v in tasks.items())))
    else:
        facts.append(("Tasks", nm))
    if isinstance(speed, dict):
        facts.append(("Speed", f"{_count(speed.get('prompt_tokens'))}-token prompt, "
                               f"{_count(speed.get('new_tokens'))} new tokens, {_count(speed.get('repeats'))} repeats"))
    else:
        facts.append(("Speed", nm))
    threads = _get(speed, "threads") or next((t for m in _models(results) if (t := _get(m, "speed", "threads"))), None)
    facts.append(("Threads", _count(threads) if threads else nm))
    return [(k, str(v)) for k, v in facts]


def _count(x: Any) -> str:
    v = _num(x)
    return "?" if v is None else f"{v:,.0f}"


def _task_items(task: str, proto: Any, results: dict) -> str:
    n = _get(proto, "n") or next((_get(m, "tasks", task, "n") for m in _models(results)
                                  if _get(m, "tasks", task, "n")), None)
    if n:
        return f"{_count(n)} items"
    return "all items" if _get(proto, "limit") is None else f"≤ {_count(_get(proto, 'limit'))} items"


class Column(NamedTuple):
    header: str
    tip: str
    value: Callable[[dict], float | None]
    fmt: Callable[[float], str]
    better: str | None  # "min", "max" or None (not compared)
    group: str | None = None  # a shared header above several columns (a task's acc and acc_norm)
    full: str | None = None  # the name outside the table, when header alone is ambiguous

    @property
    def label(self) -> str:
        return self.full or (f"{self.group} {self.header}" if self.group else self.header)


def _columns(results: dict, models: list[dict]) -> list[Column]:
    ref = next((m for m in models if m.get("is_reference")), None)
    ref_ppl = _num(ref.get("perplexity")) if ref else None

    def dppl(m: dict) -> float | None:
        p = _num(m.get("perplexity"))
        return None if p is None or not ref_ppl or m is ref else 100 * (p / ref_ppl - 1)

    def speed(key: str) -> Callable[[dict], float | None]:
        return lambda m: (s[0] if (s := _spread(_get(m, "speed", key))) else None)

    def field(key: str) -> Callable[[dict], float | None]:
        return lambda m: _num(m.get(key))

    cols = [
        Column("size", "bytes of the weight files", field("size_bytes"), fmt_bytes, "min"),
        Column("bits/w", "bits per weight, averaged over quantized linear weights incl. scales",
               field("bits_per_weight"), lambda v: f"{v:.2f}", "min"),
        Column("ppl", "perplexity on the protocol text", field("perplexity"), lambda v: f"{v:.2f}", "min"),
        Column("Δppl", "perplexity change against the reference", dppl, lambda v: f"{v:+.2f}%", "min"),
        Column("KL", "mean KL(P_ref ‖ P_model), nats/token", field("kl"), _sig, "min"),
        Column("top-1", "top-1 agreement with the reference", field("top1"), lambda v: f"{100 * v:.2f}%", "max"),
    ]
    for task in _task_order(results, models):
        for metric in ("acc", "acc_norm"):
            cols.append(Column(metric, f"{task} {metric}", lambda m, t=task, k=metric: _num(_get(m, "tasks", t, k)),
                               lambda v: f"{100 * v:.1f}%", "max", group=TASK_NAMES.get(task, task)))
    cols += [
        Column("prefill", "prompt tokens per second (median)", speed("prefill_tok_s"), _rate, "max", "tok/s",
               "prefill tok/s"),
        Column("decode", "generated tokens per second (median)", speed("decode_tok_s"), _rate, "max", "tok/s",
               "decode tok/s"),
        Column("peak RSS", "peak resident memory of a fresh process", speed("peak_rss_bytes"), fmt_bytes, "min"),
    ]
    return cols


def _task_order(results: dict, models: list[dict]) -> list[str]:
    order = list(_get(results, "protocol", "tasks") or {})
    for m in models:
        order += [t for t in (m.get("tasks") or {}) if t not in order]
    return order


def _thead(cols: list[Column]) -> str:
    """One header row, or two when some columns share a group header."""
    if not any(c.group for c in cols):
        return "<tr><th>model</th>" + "".join(f'<th title="{_e(c.tip)}">{_e(c.header)}</th>' for c in cols) + "</tr>"
    top, sub = ['<th rowspan="2">model</th>'], []
    for i, c in enumerate(cols):
        if c.group is None:
            top.append(f'<th rowspan="2" title="{_e(c.tip)}">{_e(c.header)}</th>')
        else:
            if i == 0 or cols[i - 1].group != c.group:
                span = next((j for j in range(i, len(cols)) if cols[j].group != c.group), len(cols)) - i
                top.append(f'<th colspan="{span}" class="group">{_e(c.group)}</th>')
            sub.append(f'<th title="{_e(c.tip)}">{_e(c.header)}</th>')
    return f"<tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr>"


def summary_table(results: dict, models: list[dict], colors: dict[str, str]) -> str:
    cols = _columns(results, models)
    values = [[c.value(m) for m in models] for c in cols]
    kept = [i for i, vs in enumerate(values) if any(v is not None for v in vs)]
    dropped = [c.label for i, c in enumerate(cols) if i not in kept and not c.header.startswith("Δ")]
    dropped += [] if _task_order(results, models) else ["tasks"]
    rows = []
    for r, m in enumerate(models):
        name = _name(m)
        tag = ' <span class="tag">ref</span>' if m.get("is_reference") else ""
        cells = [f'<th scope="row"><span class="sw" style="background:{colors[name]}"></span>{_e(name)}{tag}</th>']
        cells += [_cell(cols[i], values[i], r, m) for i in kept]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = f'<p class="nm">Not measured: {_e(", ".join(dropped))}.</p>' if dropped else ""
    return (f'<div class="scroll"><table class="summary"><thead>{_thead([cols[i] for i in kept])}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>'
            '<p class="cap">Highlighted: the best value of each column. Sizes in decimal units (1 MB = 10⁶ bytes); '
            '— = not measured.</p>' + note)


def _cell(col: Column, vals: list[float | None], r: int, m: dict) -> str:
    v = vals[r]
    if v is None:
        if col.header.startswith("Δ") and m.get("is_reference"):
            return '<td class="na">ref</td>'
        return '<td class="na" title="not measured">—</td>'
    present = [x for x in vals if x is not None]
    best = col.better and len(set(present)) > 1 and v == (min(present) if col.better == "min" else max(present))
    return f'<td class="best">{_e(col.fmt(v))}</td>' if best else f"<td>{_e(col.fmt(v))}</td>"


def generations_table(models: list[dict], colors: dict[str, str]) -> str:
    have = [m for m in models if isinstance(m.get("generations"), list) and m["generations"]]
    if not have:
        return _not_measured("Generations", "run `frugal eval --generate`")
    prompts: list[str] = []
    texts: dict[tuple[str, str], str] = {}
    for m in have:
        for g in m["generations"]:
            if isinstance(g, dict) and "prompt" in g:
                p = str(g["prompt"])
                prompts += [] if p in prompts else [p]
                texts[(_name(m), p)] = str(g.get("text", ""))
    head = "".join(f'<th><span class="sw" style="background:{colors[_name(m)]}"></span>{_e(_name(m))}</th>' for m in have)
    rows = []
    for p in prompts:
        cells = "".join(f'<td class="gen">{_e(texts[(_name(m), p)])}</td>' if (_name(m), p) in texts
                        else '<td class="na">—</td>' for m in have)
        rows.append(f'<tr><th scope="row" class="prompt">{_e(p)}</th>{cells}</tr>')
    return (f'<div class="scroll"><table class="gens"><thead><tr><th>prompt</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>'
            '<p class="cap">Greedy decoding from the same prompts; the generated continuation only.</p>')


# ---------------------------------------------------------------------------------------------
# Page

CSS = """
:root{--fg:#1d2330;--muted:#5f6b7a;--line:#dfe3e8;--bg:#f6f7f9;--best:#dff3e4;--bestfg:#11622a}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
header h1{margin:0 0 2px;font-size:26px}
header .sub{color:var(--muted);margin:0 0 16px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px;margin:0}
.facts div{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 12px}
.facts dt{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.facts dd{margin:2px 0 0;font-weight:600;overflow-wrap:anywhere}
nav{margin:18px 0 0;font-size:14px}
nav a{color:#1f5fa8;margin-right:14px;text-decoration:none}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin-top:22px}
h2{margin:0 0 12px;font-size:19px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:14px;width:100%}
th,td{padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
thead th{background:#eef1f5;text-align:right;font-size:13px;white-space:nowrap;vertical-align:bottom}
thead tr:first-child th:first-child{text-align:left}
thead th.group{text-align:center;border-bottom:1px solid #c9d0d8}
.summary{font-size:13.5px}
.summary td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.summary tbody th{text-align:left;font-weight:600;min-width:8em;overflow-wrap:anywhere}
td.best{background:var(--best);color:var(--bestfg);font-weight:700}
td.na{color:#9aa3ad}
.tag{font-size:11px;font-weight:600;color:#fff;background:#4d4d4d;border-radius:4px;padding:1px 5px;margin-left:6px}
.sw{display:inline-block;width:11px;height:11px;border-radius:3px;margin-right:7px;vertical-align:-1px}
.gens{table-layout:fixed}
.gens thead th{text-align:left;white-space:normal;overflow-wrap:anywhere}
.gens th.prompt{text-align:left;width:19%;font-weight:600;white-space:pre-wrap;background:#fafbfc}
.gens td.gen{white-space:pre-wrap;font:13px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;
overflow-wrap:anywhere}
img.plot{display:block;width:100%;max-width:1000px;height:auto;margin:4px auto}
.cap{color:var(--muted);font-size:13px;margin:6px 0 0}
.nm{color:var(--muted);background:#fafbfc;border:1px dashed var(--line);border-radius:6px;padding:10px 12px;margin:4px 0}
footer{color:var(--muted);font-size:12px;margin-top:24px;text-align:center}
"""

SECTIONS = (("summary", "Summary"), ("quality", "Quality vs size"), ("layers", "Per-layer error"),
            ("blocks", "Per-block error"), ("speed", "Speed and memory"), ("generations", "Generations"))


def render_html(results: dict) -> str:
    """The whole page as a string (ASCII: anything else is written as a character reference)."""
    models = _models(results)
    colors = model_colors(models)
    ref = next((_name(m) for m in models if m.get("is_reference")), None)
    bodies = {
        "summary": summary_table(results, models, colors) if models else _not_measured("Models", "no models"),
        "quality": _plot_section(lambda: plot_pareto(models, colors, ref), "Quality vs size"),
        "layers": _plot_section(lambda: plot_layer_errors(models, colors), "Per-layer error"),
        "blocks": _plot_section(lambda: plot_block_errors(models, colors), "Per-block error"),
        "speed": _plot_section(lambda: plot_speed(models, colors), "Speed and memory"),
        "generations": generations_table(models, colors),
    }
    facts = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in _facts(results))
    schema = results.get("schema_version")
    warn = ("" if schema in (None, 1) else f'<p class="nm">results.json schema_version {_e(schema)}: this report '
            'knows version 1; some fields may be missing.</p>')
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in SECTIONS)
    sections = "".join(f'<section id="{k}"><h2>{_e(t)}</h2>{bodies[k]}</section>' for k, t in SECTIONS)
    names = ", ".join(_name(m) for m in models)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e("frugal report: " + names if names else "frugal report")}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>frugal evaluation report</h1>
<p class="sub">{len(models)} model{"s" if len(models) != 1 else ""}: {_e(names)}</p>
<dl class="facts">{facts}</dl>
{warn}<nav>{nav}</nav>
</header>
{sections}
<footer>frugal {_e(results.get("frugal_version", "?"))} · results.json schema_version {_e(schema or "?")}</footer>
</main>
</body>
</html>
"""
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(results: dict, out_dir: Path) -> Path:
    """Write `out_dir/report.html` (atomically: a reader never sees half a page) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    write_text_atomic(path, render_html(results))
    return path
