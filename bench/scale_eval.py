"""Quality of the scale test's compressions: perplexity and KL against the float model, and the best
recipe's GGUF run in llama.cpp.

    .venv/bin/python bench/fetch_q15.py
    .venv/bin/python bench/memory_peak.py --model bench/.work/q15/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --recipes best,rtn:memory,gptq:memory --samples 8 --awq-tokens 1024
    .venv/bin/python bench/scale_eval.py --model bench/.work/q15/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

The compressed models are bench/memory_peak.py's in-memory outputs (bench/.work/memory/out-<recipe>-memory).
Each is loaded alone beside the float model (two models in memory, not all of them), and evaluated on the
first --tokens tokens of wikitext-2-raw test in windows of 512 (frugal's protocol; the float model's
forward is repeated per model). The best recipe's output is exported with `frugal export --format gguf`
and llama.cpp (llama-cpp-python in bench/.venvs/llama-cpp, bench/gguf_vs_llamacpp.py) computes the
perplexity of that file and of the source GGUF on the same windows. Rewrites the section
`scale-eval-<model file stem>` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402
from memory_peak import WORK, float_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("rtn", "gptq", "best")
log = logging.getLogger("scale_eval")


def quality(directory: Path, outs: dict[str, Path], tokens: int) -> tuple[dict, dict]:
    """{recipe: EvalResult} of each output against the float model, and the float model's EvalResult."""
    from frugal.evaluation.metrics import Protocol, evaluate
    from frugal.load.model import load_model, shared_dir

    ref = load_model(directory)
    protocol = Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, tokens)
    results, float_result = {}, None
    for recipe, out in outs.items():
        model = load_model(out).model
        res = {r.name: r for r in evaluate({recipe: model}, ref.tokenizer, protocol, ref=ref.model, ref_name="float")}
        results[recipe], float_result = res[recipe], res["float"]
        log.info("%s: ppl %.3f (float %.3f), KL %.4f", recipe, res[recipe].ppl, res["float"].ppl, res[recipe].kl)
        del model
        gc.collect()
    return results, float_result


def llama_cpp_ppl(gguf_files: dict[str, Path], directory: Path, tokens: int, threads: int) -> dict[str, dict]:
    """llama.cpp's perplexity of each GGUF on frugal's evaluation windows."""
    import numpy as np

    import gguf_vs_llamacpp as G
    from frugal.evaluation.metrics import Protocol, windows
    from frugal.load.model import load_tokenizer, shared_dir

    G.ensure_venv()
    tok = load_tokenizer(directory)
    wins, bos = windows(tok, Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, tokens))
    path = WORK / "scale-windows.npy"
    np.save(path, wins.numpy())
    bos_args = [] if bos is None else ["--bos", str(bos)]
    return {name: G.runner("ppl", str(f), str(path), *bos_args, threads=threads) for name, f in gguf_files.items()}


def export_gguf(out: Path) -> tuple[Path, float]:
    dst = WORK / "best-gguf"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "frugal.cli", "export", str(out), "--format", "gguf", "-o", str(dst),
                    "--overwrite"], check=True)
    return dst / "model.gguf", time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the model memory_peak compressed (directory or GGUF file)")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default 4096: 8 windows of 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gguf", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    directory = float_dir(a.model)
    outs = {r: WORK / f"out-{r}-memory" for r in RECIPES if (WORK / f"out-{r}-memory" / "config.json").is_file()}
    if not outs:
        raise SystemExit(f"scale_eval: no outputs under {WORK}; run bench/memory_peak.py first")
    t0 = time.perf_counter()
    results, ref = quality(directory, outs, a.tokens)
    rows = [["float (the GGUF dequantized)", f"{ref.ppl:.3f}", "", "", "", ""]]
    for recipe, r in results.items():
        rows.append([recipe, f"{r.ppl:.3f}", f"{100 * (r.ppl / ref.ppl - 1):+.2f}%", f"{r.kl:.4f}", f"{r.top1:.3f}", ""])
    gguf_note = ""
    if not a.no_gguf and "best" in outs and Path(a.model).suffix == ".gguf":
        gguf, secs = export_gguf(outs["best"])
        lc = llama_cpp_ppl({"source": Path(a.model), "best": gguf}, directory, a.tokens, a.threads)
        rows.append(["source GGUF in llama.cpp", f"{lc['source']['ppl']:.3f}", "", "", "", f"{Path(a.model).stat().st_size / 1e6:.0f} MB"])
        rows.append(["best, exported to GGUF, in llama.cpp", f"{lc['best']['ppl']:.3f}",
                     f"{100 * (lc['best']['ppl'] / lc['source']['ppl'] - 1):+.2f}% vs source", "", "",
                     f"{gguf.stat().st_size / 1e6:.0f} MB"])
        gguf_note = f" GGUF export took {secs:.0f} s."
    body = render(rows, directory, a, time.perf_counter() - t0, gguf_note)
    (WORK / "scale-eval.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    publish(f"scale-eval-{Path(a.model).stem}", f"Quality of the scale test: {Path(a.model).name}",
            "bench/scale_eval.py", sys.argv[1:], body, docs=not a.no_docs)


def render(rows: list, directory: Path, a, seconds: float, note: str) -> str:
    head = (f"The in-memory outputs of bench/memory_peak.py (W4 g64; rtn, gptq and best = AWQ + asymmetric GPTQ, "
            f"8 x 512 calibration tokens, AWQ's search on 1024 of them) against the float model ({directory.name}, float32), first {a.tokens} "
            f"tokens of wikitext-2-raw test in windows of 512. KL: mean per token against the float model; top-1: "
            f"agreement of the most likely next token. llama.cpp: llama-cpp-python 0.3.36, {a.threads} threads, "
            f"the same windows.{note} Whole run {seconds / 60:.1f} min.\n\n")
    lines = ["| model | ppl | vs float | KL | top-1 | file |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
