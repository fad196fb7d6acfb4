"""report.html: self-contained, deterministic, escaped, degrades section by section, and renders in
a real browser (headless Chromium, skipped when /usr/bin/chromium is absent)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from frugal.report.html import layer_series, pareto_front, render_html, write_report

CHROMIUM = Path("/usr/bin/chromium")
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _layers(scale: float, with_output: bool = True) -> dict:
    out = {}
    for b in range(2):
        for i, kind in enumerate(KINDS):
            w = round(scale * (0.08 + 0.01 * i + 0.02 * b), 6)
            out[f"model.layers.{b}.{kind}"] = {"bits": 4, "group_size": 64, "symmetric": True,
                                                 "weight_rel_error": w,
                                                 "output_rel_error": round(w / 4, 6) if with_output else None,
                                                 "gptq_loss": 1.3 if with_output else None}
    return out


def _speed(prefill: float, decode: float, rss: int) -> dict:
    return {"prefill_tok_s": {"median": prefill, "min": prefill * 0.94, "max": prefill * 1.05},
            "decode_tok_s": {"median": decode, "min": decode * 0.95, "max": decode * 1.03},
            "ttft_s": {"median": 128 / prefill, "min": 128 / prefill * 0.95, "max": 128 / prefill * 1.06},
            "peak_rss_bytes": rss}


PROMPTS = ("The capital of France is", "def fibonacci(n):")


def _model(name, size, bpw, ppl, kl, top1, piqa, hella, speed, layers=None, blocks=None, ref=False, gens=()):
    return {"name": name, "path": f"/models/{name}", "is_reference": ref, "size_bytes": size,
            "bits_per_weight": bpw, "perplexity": ppl, "nll": 3.358, "kl": kl, "top1": top1,
            "tasks": {"piqa": {"acc": piqa[0], "acc_norm": piqa[1], "n": 300},
                      "hellaswag": {"acc": hella[0], "acc_norm": hella[1], "n": 300}},
            "layer_errors": layers,
            **({"block_errors": [{"block": f"model.layers.{i}", "rel_error": e} for i, e in enumerate(blocks)]}
               if blocks else {}),
            "speed": speed,
            "generations": [{"prompt": p, "text": t} for p, t in zip(PROMPTS, gens)]}


def sample_results() -> dict:
    """Three models following docs/results-schema.md: a float reference, GPTQ W4 and RTN W3."""
    return {
        "schema_version": 1,
        "frugal_version": "0.1.0",
        "protocol": {
            "perplexity": {"text": "wiki.test.lf.raw", "seq_len": 512, "max_tokens": 8192, "bos": False,
                           "scored_tokens": 8176},
            "tasks": {"piqa": {"limit": 300, "n": 300}, "hellaswag": {"limit": 300, "n": 300}},
            "speed": {"prompt_tokens": 128, "new_tokens": 32, "repeats": 5, "warmup": 1, "threads": 2},
        },
        "reference": "original",
        "models": [
            _model("original", 538_100_000, None, 28.74, None, None, (0.650, 0.667), (0.413, 0.520),
                   _speed(912.4, 41.27, 1_204_000_000), ref=True,
                   gens=(" Paris, the largest city in France.", "\n    if n < 2:\n        return n")),
            _model("w4g64-gptq", 151_300_000, 4.5, 30.12, 0.0412, 0.9120, (0.643, 0.671), (0.410, 0.515),
                   _speed(655.0, 52.9, 702_000_000), layers=_layers(1.0), blocks=[0.021, 0.034],
                   gens=(" Paris, which is also the capital", "\n    if n <= 1:\n        return n")),
            _model("w3g64-rtn", 120_000_000, 3.5, 41.30, 0.1870, 0.8010, (0.601, 0.622), (0.371, 0.466),
                   _speed(610.5, 55.31, 650_000_000), layers=_layers(2.5, with_output=False),
                   blocks=[0.087, 0.142],
                   gens=(" a city of the the the", "\n    return fibonacci(n - 1) + fib")),
        ],
    }


def _plots(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img class="plot"[^>]*src="data:image/svg\+xml;base64,([^"]+)"', page)]


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(sample_results())


def test_self_contained(page):
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page, flags=re.I)
    assert refs, "expected in-page links and data: images"
    assert all(r.startswith(("#", "data:")) for r in refs), [r[:60] for r in refs if not r.startswith(("#", "data:"))]
    assert not re.search(r"https?://", page), "no external address anywhere in the page"
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    page.encode("ascii")  # non-ASCII is written as character references: any encoding reads it


def test_embeds_valid_svg_plots(page):
    plots = _plots(page)
    assert len(plots) == 4  # quality vs size, per-layer, per-block, speed
    for svg in plots:
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert b"<image" not in svg and b"xlink:href=\"http" not in svg


def test_models_and_formatted_metrics(page):
    for name in ("original", "w4g64-gptq", "w3g64-rtn"):
        assert page.count(name) >= 2  # summary and generations
    for text in ("538.1 MB", "151.3 MB", "120.0 MB",        # sizes
                 "4.50", "3.50",                           # bits/weight
                 "28.74", "30.12", "41.30",                # perplexity
                 "+4.80%", "+43.70%",                      # ppl change vs reference
                 "0.0412", "0.187",                        # KL, 3 significant digits
                 "91.20%", "80.10%",                       # top-1
                 "65.0%", "66.7%", "41.3%", "52.0%",       # PIQA / HellaSwag acc, acc_norm
                 "912", "655", "41.3", "55.3",             # prefill / decode tok/s
                 "1.2 GB", "702.0 MB",                     # peak RSS
                 "wiki.test.lf.raw", "512 tokens", "8,176", "PIQA (300 items)", "HellaSwag (300 items)"):
        assert text in page, text
    assert re.search(r"<dt>Threads</dt><dd>2</dd>", page)


COLUMNS = ["size", "bits/w", "ppl", "Δppl", "KL", "top-1", "PIQA acc", "PIQA acc_norm", "HellaSwag acc",
           "HellaSwag acc_norm", "prefill tok/s", "decode tok/s", "peak RSS"]


def _summary(page: str) -> tuple[str, list[list[tuple[str, str]]]]:
    """(the header HTML, rows of (td class, text)) of the summary table."""
    table = page[page.index('<table class="summary">'):]
    table = table[:table.index("</table>")]
    rows = [re.findall(r'<td(?: class="([^"]*)")?[^>]*>([^<]*)</td>', r)
            for r in re.findall(r"<tr>(.*?)</tr>", table[table.index("<tbody>"):])]
    return table[:table.index("</thead>")], rows


def test_summary_columns_and_best_value_highlighted(page):
    head, rows = _summary(page)
    assert [len(r) for r in rows] == [len(COLUMNS)] * 3
    for group in ('<th colspan="2" class="group">PIQA</th>', '<th colspan="2" class="group">HellaSwag</th>',
                  '<th colspan="2" class="group">tok/s</th>'):
        assert group in head
    best = {col: [text for row in rows for cls, text in [row[j]] if cls == "best"] for j, col in enumerate(COLUMNS)}
    assert best == {"size": ["120.0 MB"], "bits/w": ["3.50"], "ppl": ["28.74"], "Δppl": ["+4.80%"],
                    "KL": ["0.0412"], "top-1": ["91.20%"], "PIQA acc": ["65.0%"], "PIQA acc_norm": ["67.1%"],
                    "HellaSwag acc": ["41.3%"], "HellaSwag acc_norm": ["52.0%"], "prefill tok/s": ["912"],
                    "decode tok/s": ["55.3"], "peak RSS": ["650.0 MB"]}
    # the reference row: no bits/weight (float), "ref" instead of a change against itself
    assert rows[0][:4] == [("", "538.1 MB"), ("na", "&#8212;"), ("best", "28.74"), ("na", "ref")]


def test_generations_side_by_side(page):
    table = page[page.index('<table class="gens">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + len(PROMPTS)
    assert "Paris, which is also the capital" in table
    assert "if n &lt;= 1:" in table  # escaped, whitespace kept by CSS


def test_same_bytes_every_time(page, tmp_path):
    results = sample_results()
    first = page
    assert render_html(results) == first
    # and in a fresh process, with another hash seed and a build date set
    (tmp_path / "r.json").write_text(json.dumps(results))
    code = ("import json,sys; from frugal.report.html import render_html; "
            "sys.stdout.write(render_html(json.load(open(sys.argv[1]))))")
    env = {**os.environ, "PYTHONHASHSEED": "123", "SOURCE_DATE_EPOCH": "1700000000"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json")], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout
    assert out == first


def test_perplexity_only_degrades():
    results = {"schema_version": 1, "protocol": {"perplexity": {"text": "t.txt", "seq_len": 256}},
               "reference": None, "models": [{"name": "solo", "size_bytes": 1000, "perplexity": 12.5}]}
    page = render_html(results)
    assert "solo" in page and "12.50" in page
    assert len(_plots(page)) == 1  # perplexity vs size only
    for section in ("Per-layer error", "Per-block error", "Speed and memory", "Generations"):
        assert f"<strong>{section}: not measured</strong>" in page, section
    assert "Not measured: bits/w, KL, top-1, prefill tok/s, decode tok/s, peak RSS, tasks." in page
    assert "<dt>Tasks</dt><dd>not measured</dd>" in page and "<dt>Threads</dt><dd>not measured</dd>" in page
    assert 'class="best"' not in page  # nothing to compare


def test_empty_and_malformed_inputs_render():
    assert "not measured" in render_html({})
    odd = sample_results()
    odd["models"][1]["perplexity"] = float("nan")
    odd["models"][1]["speed"] = None
    odd["models"][2]["layer_errors"] = {"lm_head": "oops"}
    odd["models"][2]["block_errors"] = [{"block": "x"}, "junk"]
    odd["schema_version"] = 2
    page = render_html(odd)
    assert "schema_version 2: this report knows version 1" in page
    assert len(_plots(page)) == 4


def test_special_characters_are_escaped():
    results = sample_results()
    evil = '<b>x</b> & "q" \'s $a$ 50%'
    results["models"][1]["name"] = evil
    results["models"][1]["generations"][0]["text"] = "</td><script>alert(1)</script>"
    results["models"][1]["generations"][1]["text"] = "a\x03b\x85c\ud800"
    results["protocol"]["perplexity"]["text"] = "<i>corpus</i>.txt"
    page = render_html(results)
    assert "a&#9219;b&#65533;c&#65533;" in page  # control characters made visible, never raw
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", page)
    assert "<b>x</b>" not in page and "<script>" not in page and "<i>corpus" not in page
    assert "&lt;b&gt;x&lt;/b&gt; &amp; &quot;q&quot; &#x27;s $a$ 50%" in page
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert len(_plots(page)) == 4  # `$a$` is drawn as text, not parsed as mathtext


def test_write_report(page, tmp_path):
    path = write_report(sample_results(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temporary file left
    assert path.read_text(encoding="utf-8") == page


def test_crowded_and_identical_points_are_all_labelled():
    models = [{"name": f"m{i}", "is_reference": i == 0, "size_bytes": 1e8, "perplexity": 20.0,
               "kl": None if i == 0 else 0.1} for i in range(8)]
    page = render_html({"models": models})
    (svg,) = _plots(page)
    assert len(ET.fromstring(svg).findall(".//{http://www.w3.org/2000/svg}g[@id]")) > 0
    assert all(f"m{i}" in page for i in range(8))


def test_import_is_light():
    code = "import sys, frugal.report.html; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pareto_front():
    pts = [(538.1, 28.74), (151.3, 30.12), (120.0, 41.3), (160.0, 31.0), (100.0, 45.0)]
    assert pareto_front(pts) == [(100.0, 45.0), (120.0, 41.3), (151.3, 30.12), (538.1, 28.74)]
    assert pareto_front([]) == []


def test_layer_series_order_and_fallback():
    metric, vals = layer_series(_layers(1.0))
    assert metric == "output_rel_error" and len(vals) == 14
    assert [n.split(".")[-1] for n, _ in vals[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]
    assert vals[0] == ("model.layers.0.self_attn.q_proj", 0.02)
    metric, vals = layer_series(_layers(2.5, with_output=False))
    assert metric == "weight_rel_error" and vals[0][1] == pytest.approx(0.2)
    # block 10 sorts after block 2, layers outside blocks last
    names = [n for n, _ in layer_series({"lm_head": {"weight_rel_error": 1},
                                         "model.layers.10.mlp.up_proj": {"weight_rel_error": 1},
                                         "model.layers.2.mlp.up_proj": {"weight_rel_error": 1}})[1]]
    assert names == ["model.layers.2.mlp.up_proj", "model.layers.10.mlp.up_proj", "lm_head"]
    assert layer_series(None) is None and layer_series({}) is None


# ---------------------------------------------------------------------------------------------
# A real browser. CI: `apt-get install -y chromium` (Debian) puts it at /usr/bin/chromium.

CONSOLE_PROBLEMS = re.compile(r"Uncaught|Failed to load resource|net::ERR_FILE_NOT_FOUND|"
                              r"Not allowed to load local resource|Refused to load", re.I)
# Chromium's log does not report a file:// image that fails to load, so the DOM check runs on a copy of
# the page with this probe appended (the report itself has no script): after the load event, it writes
# "<images decoded>/<images>" into <body data-images>.
PROBE = ('<script>addEventListener("load", () => {const i = [...document.images]; document.body.dataset.images = '
         'i.filter(x => x.complete && x.naturalWidth > 0).length + "/" + i.length})</script>')


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--crash-dumps-dir={tmp_path}",
           "--enable-logging=stderr", "--v=0", *args]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)


def _with_probe(page: str, path: Path) -> str:
    path.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    return path.as_uri()


needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(),
                                    reason=f"{CHROMIUM} not installed (Debian: apt-get install -y chromium)")


@needs_chromium
def test_renders_in_headless_chromium(page, tmp_path):
    from matplotlib.image import imread

    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000",
                     "--hide-scrollbars", "--default-background-color=ffffffff", (tmp_path / "report.html").as_uri())
    assert shot.is_file(), f"no screenshot; chromium exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert not CONSOLE_PROBLEMS.search(proc.stderr), proc.stderr[-3000:]
    assert shot.stat().st_size > 50_000
    img = imread(shot)[..., :3]  # (H, W, 3) floats in 0..1
    assert img.shape[:2] == (4000, 1280)
    nonwhite = (img < 0.95).any(axis=-1).mean()
    saturated = (img.max(axis=-1) - img.min(axis=-1) > 0.35).mean()  # model and kind colours in the plots
    assert nonwhite > 0.05, f"screenshot looks blank: {nonwhite:.1%} non-white pixels"
    assert saturated > 0.005, f"plots do not seem to be drawn: {saturated:.2%} coloured pixels"

    dom = _chromium(tmp_path, "--dump-dom", _with_probe(page, tmp_path / "probe.html"))
    assert not CONSOLE_PROBLEMS.search(dom.stderr), dom.stderr[-3000:]
    assert '<body data-images="4/4">' in dom.stdout, re.findall(r"<body[^>]*>", dom.stdout)
    assert len(re.findall(r'<img class="plot"[^>]*src="data:image/svg\+xml;base64,', dom.stdout)) == 4
    assert dom.stdout.count("<section") == 6 and "w3g64-rtn" in dom.stdout


@needs_chromium
def test_chromium_checks_catch_problems(tmp_path):
    """The browser checks above are not vacuous: a missing image and a script error are both caught."""
    bad = '<html><body><img src="missing.png"><script>undefinedFn()</script></body></html>'
    proc = _chromium(tmp_path, "--dump-dom", _with_probe(bad, tmp_path / "bad.html"))
    assert re.search(r"Uncaught ReferenceError: undefinedFn", proc.stderr), proc.stderr[-3000:]
    assert '<body data-images="0/1">' in proc.stdout, proc.stdout[-2000:]
