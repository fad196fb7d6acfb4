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

from pathlib import Path
from typing import Any, Callable, NamedTuple

from frugal.atomic import write_text_atomic
from frugal.report.charts import (  # noqa: F401 (layer_series, pareto_front: re-exported)
    SVG_METADATA, TASK_NAMES, dig, esc, finite, fmt_rate, fmt_sig, layer_series, model_colors, model_name,
    models_of, new_figure, not_measured, pareto_front, plot_block_errors, plot_layer_errors, plot_pareto,
    plot_section, plot_speed, plot_style, spread)
from frugal.report.table import fmt_bytes


# Plots, colours and the small helpers live in frugal.report.charts; the header, tables and page here.


# ---------------------------------------------------------------------------------------------
# Header and tables


def _facts(results: dict) -> list[tuple[str, str]]:
    """(label, value) for the header: what every number in the report was measured on."""
    proto = results.get("protocol") if isinstance(results.get("protocol"), dict) else {}
    ppl, tasks, speed = proto.get("perplexity"), proto.get("tasks"), proto.get("speed")
    nm = "not measured"
    facts = [("Reference", results.get("reference") or "none")]
    if isinstance(ppl, dict):
        seq = finite(ppl.get("seq_len"))
        window = f"{seq:.0f} tokens, {'BOS prepended' if ppl.get('bos') else 'no BOS'}" if seq else "?"
        scored = _count(ppl.get("scored_tokens"))
        if finite(ppl.get("max_tokens")):
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
    threads = dig(speed, "threads") or next((t for m in models_of(results) if (t := dig(m, "speed", "threads"))), None)
    facts.append(("Threads", _count(threads) if threads else nm))
    return [(k, str(v)) for k, v in facts]


def _count(x: Any) -> str:
    v = finite(x)
    return "?" if v is None else f"{v:,.0f}"


def _task_items(task: str, proto: Any, results: dict) -> str:
    n = dig(proto, "n") or next((dig(m, "tasks", task, "n") for m in models_of(results)
                                  if dig(m, "tasks", task, "n")), None)
    if n:
        return f"{_count(n)} items"
    return "all items" if dig(proto, "limit") is None else f"≤ {_count(dig(proto, 'limit'))} items"


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
    ref_ppl = finite(ref.get("perplexity")) if ref else None

    def dppl(m: dict) -> float | None:
        p = finite(m.get("perplexity"))
        return None if p is None or not ref_ppl or m is ref else 100 * (p / ref_ppl - 1)

    def speed(key: str) -> Callable[[dict], float | None]:
        return lambda m: (s[0] if (s := spread(dig(m, "speed", key))) else None)

    def field(key: str) -> Callable[[dict], float | None]:
        return lambda m: finite(m.get(key))

    cols = [
        Column("size", "bytes of the weight files", field("size_bytes"), fmt_bytes, "min"),
        Column("bits/w", "bits per weight, averaged over quantized linear weights incl. scales",
               field("bits_per_weight"), lambda v: f"{v:.2f}", "min"),
        Column("ppl", "perplexity on the protocol text", field("perplexity"), lambda v: f"{v:.2f}", "min"),
        Column("Δppl", "perplexity change against the reference", dppl, lambda v: f"{v:+.2f}%", "min"),
        Column("KL", "mean KL(P_ref ‖ P_model), nats/token", field("kl"), fmt_sig, "min"),
        Column("top-1", "top-1 agreement with the reference", field("top1"), lambda v: f"{100 * v:.2f}%", "max"),
    ]
    for task in _task_order(results, models):
        for metric in ("acc", "acc_norm"):
            cols.append(Column(metric, f"{task} {metric}", lambda m, t=task, k=metric: finite(dig(m, "tasks", t, k)),
                               lambda v: f"{100 * v:.1f}%", "max", group=TASK_NAMES.get(task, task)))
    cols += [
        Column("prefill", "prompt tokens per second (median)", speed("prefill_tok_s"), fmt_rate, "max", "tok/s",
               "prefill tok/s"),
        Column("decode", "generated tokens per second (median)", speed("decode_tok_s"), fmt_rate, "max", "tok/s",
               "decode tok/s"),
        Column("peak RSS", "peak resident memory of a fresh process", speed("peak_rss_bytes"), fmt_bytes, "min"),
    ]
    return cols


def _task_order(results: dict, models: list[dict]) -> list[str]:
    order = list(dig(results, "protocol", "tasks") or {})
    for m in models:
        order += [t for t in (m.get("tasks") or {}) if t not in order]
    return order


def _thead(cols: list[Column]) -> str:
    """One header row, or two when some columns share a group header."""
    if not any(c.group for c in cols):
        return "<tr><th>model</th>" + "".join(f'<th title="{esc(c.tip)}">{esc(c.header)}</th>' for c in cols) + "</tr>"
    top, sub = ['<th rowspan="2">model</th>'], []
    for i, c in enumerate(cols):
        if c.group is None:
            top.append(f'<th rowspan="2" title="{esc(c.tip)}">{esc(c.header)}</th>')
        else:
            if i == 0 or cols[i - 1].group != c.group:
                span = next((j for j in range(i, len(cols)) if cols[j].group != c.group), len(cols)) - i
                top.append(f'<th colspan="{span}" class="group">{esc(c.group)}</th>')
            sub.append(f'<th title="{esc(c.tip)}">{esc(c.header)}</th>')
    return f"<tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr>"


def summary_table(results: dict, models: list[dict], colors: dict[str, str]) -> str:
    cols = _columns(results, models)
    values = [[c.value(m) for m in models] for c in cols]
    kept = [i for i, vs in enumerate(values) if any(v is not None for v in vs)]
    dropped = [c.label for i, c in enumerate(cols) if i not in kept and not c.header.startswith("Δ")]
    dropped += [] if _task_order(results, models) else ["tasks"]
    rows = []
    for r, m in enumerate(models):
        name = model_name(m)
        tag = ' <span class="tag">ref</span>' if m.get("is_reference") else ""
        cells = [f'<th scope="row"><span class="sw" style="background:{colors[name]}"></span>{esc(name)}{tag}</th>']
        cells += [_cell(cols[i], values[i], r, m) for i in kept]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = f'<p class="nm">Not measured: {esc(", ".join(dropped))}.</p>' if dropped else ""
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
    return f'<td class="best">{esc(col.fmt(v))}</td>' if best else f"<td>{esc(col.fmt(v))}</td>"


def generations_table(models: list[dict], colors: dict[str, str]) -> str:
    have = [m for m in models if isinstance(m.get("generations"), list) and m["generations"]]
    if not have:
        return not_measured("Generations", "run `frugal eval --generate`")
    prompts: list[str] = []
    texts: dict[tuple[str, str], str] = {}
    for m in have:
        for g in m["generations"]:
            if isinstance(g, dict) and "prompt" in g:
                p = str(g["prompt"])
                prompts += [] if p in prompts else [p]
                texts[(model_name(m), p)] = str(g.get("text", ""))
    head = "".join(f'<th><span class="sw" style="background:{colors[model_name(m)]}"></span>{esc(model_name(m))}</th>' for m in have)
    rows = []
    for p in prompts:
        cells = "".join(f'<td class="gen">{esc(texts[(model_name(m), p)])}</td>' if (model_name(m), p) in texts
                        else '<td class="na">—</td>' for m in have)
        rows.append(f'<tr><th scope="row" class="prompt">{esc(p)}</th>{cells}</tr>')
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
    models = models_of(results)
    colors = model_colors(models)
    ref = next((model_name(m) for m in models if m.get("is_reference")), None)
    bodies = {
        "summary": summary_table(results, models, colors) if models else not_measured("Models", "no models"),
        "quality": plot_section(lambda: plot_pareto(models, colors, ref), "Quality vs size"),
        "layers": plot_section(lambda: plot_layer_errors(models, colors), "Per-layer error"),
        "blocks": plot_section(lambda: plot_block_errors(models, colors), "Per-block error"),
        "speed": plot_section(lambda: plot_speed(models, colors), "Speed and memory"),
        "generations": generations_table(models, colors),
    }
    facts = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in _facts(results))
    schema = results.get("schema_version")
    warn = ("" if schema in (None, 1) else f'<p class="nm">results.json schema_version {esc(schema)}: this report '
            'knows version 1; some fields may be missing.</p>')
    nav = "".join(f'<a href="#{k}">{esc(t)}</a>' for k, t in SECTIONS)
    sections = "".join(f'<section id="{k}"><h2>{esc(t)}</h2>{bodies[k]}</section>' for k, t in SECTIONS)
    names = ", ".join(model_name(m) for m in models)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc("frugal report: " + names if names else "frugal report")}</title>
<style>{" ".join(CSS.split())}</style>
</head>
<body>
<main>
<header>
<h1>frugal evaluation report</h1>
<p class="sub">{len(models)} model{"s" if len(models) != 1 else ""}: {esc(names)}</p>
<dl class="facts">{facts}</dl>
{warn}<nav>{nav}</nav>
</header>
{sections}
<footer>frugal {esc(results.get("frugal_version", "?"))} · results.json schema_version {esc(schema or "?")}</footer>
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
