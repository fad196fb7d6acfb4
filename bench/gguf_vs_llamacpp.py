"""frugal's GGUF files against llama.cpp's own quantizer, measured in llama.cpp on the CPU.

    .venv/bin/python bench/gguf_vs_llamacpp.py                 # Q4_0 and Q4_K_M, 128 x 512 calibration
    .venv/bin/python bench/gguf_vs_llamacpp.py --quick         # 16 x 512 calibration, 8 windows

One float32 GGUF of the default model (written by frugal) is the source of both: llama.cpp's
`llama_model_quantize` (no importance matrix) and frugal (`gguf_type`, GPTQ or RTN onto the same
GGML grids, same per-tensor types). Perplexity is computed by llama.cpp (llama-cpp-python, built in
bench/.venvs/llama-cpp; the first run compiles it, 10-30 minutes) on frugal's evaluation windows;
frugal's own (PyTorch) perplexity of its models is shown beside it. Rewrites the `gguf-vs-llamacpp`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import write_section  # noqa: E402

VENV = ROOT / "bench" / ".venvs" / "llama-cpp"
WORK = ROOT / "bench" / ".work" / "gguf"
RUNNER = ROOT / "bench" / "engines" / "llamacpp_runner.py"
LLAMA_CPP = "llama-cpp-python==0.3.36"
log = logging.getLogger("bench")


def ensure_venv() -> Path:
    """The llama-cpp-python virtualenv (CPU torch pinned; llama.cpp compiled from source once)."""
    py = VENV / "bin" / "python"
    if not (VENV / ".installed").is_file():
        log.info("building %s in %s (compiles llama.cpp: 10-30 minutes)", LLAMA_CPP, VENV)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", LLAMA_CPP, "numpy"], check=True)
        (VENV / ".installed").write_text(LLAMA_CPP + "\n")
    return py


def runner(*args: str, threads: int) -> dict:
    out = subprocess.run([str(VENV / "bin" / "python"), str(RUNNER), *args, "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def frugal_gguf(model_dir, tok, calib, recipe: dict, out: Path):
    """Compress a fresh copy of the model with `recipe` and write its GGUF; returns (Compressed, seconds)."""
    import frugal
    from frugal.load.model import load_model

    loaded = load_model(model_dir)
    t0 = time.perf_counter()
    c = frugal.compress(loaded.model, recipe, calib, tokenizer=tok, inplace=True, formats=("gguf",))
    seconds = time.perf_counter() - t0
    c.report.source = str(loaded.source)
    c.save(out, overwrite=True, fmt="gguf")
    return c, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q4_K_M", help="llama.cpp file types (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="16 x 512 calibration, 8 evaluation windows")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default %(default)s)")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np

    from frugal.calibrate import from_text
    from frugal.evaluation.metrics import Protocol, windows
    from frugal.exporters.gguf import write_gguf
    from frugal.load.model import load_model, shared_dir

    ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    n_calib, n_tokens = (16, 4096) if a.quick else (128, 20480)
    src = load_model(None)
    protocol = Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, n_tokens)
    wins, bos = windows(src.tokenizer, protocol)
    np.save(WORK / "windows.npy", wins.numpy())
    bos_args = [] if bos is None else ["--bos", str(bos)]
    calib = from_text(src.tokenizer, shared_dir() / "data" / "wikitext-2" / "valid.txt", n_calib, 512, 0)
    source = WORK / "source-f32.gguf"
    write_gguf(source, src.model, src.tokenizer, {}, str(src.source), float_type="F32")
    ref = runner("ppl", str(source), str(WORK / "windows.npy"), *bos_args, threads=a.threads)
    rows = [("F32 source", "-", "-", f"{mb(source):.1f}", f"{ref['ppl']:.3f}", "", "", "", "", "")]
    for ftype in a.types.split(","):
        rows += compare(ftype, a, src, calib, protocol, ref, bos_args)
    body = report(rows, ref, n_calib, wins.shape[0], a.threads)
    print(body)
    if not a.no_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "gguf-vs-llamacpp", "GGUF: frugal vs llama.cpp's quantizer",
                      f".venv/bin/python bench/gguf_vs_llamacpp.py{' --quick' if a.quick else ''}", body)


def compare(ftype, a, src, calib, protocol, ref, bos_args) -> list[tuple]:
    """llama.cpp's quantization of the source and frugal's GPTQ and RTN onto the same file type."""
    from frugal.evaluation.metrics import evaluate

    llama_path = WORK / f"llama-{ftype}.gguf"
    q = runner("quantize", str(WORK / "source-f32.gguf"), str(llama_path), ftype, threads=a.threads)
    files = {"llama.cpp": (llama_path, q["seconds"], None)}
    for method in ("gptq", "rtn"):
        recipe = {"method": method, "gguf_type": ftype,
                  "calibration": {"num_samples": calib.shape[0], "seq_len": calib.shape[1]}}
        c, seconds = frugal_gguf(None, src.tokenizer, calib, recipe, WORK / f"frugal-{method}-{ftype}")
        own = evaluate({"m": c.model}, src.tokenizer, protocol)[0].ppl
        files[f"frugal {method.upper()}"] = (WORK / f"frugal-{method}-{ftype}" / "model.gguf", seconds, own)
        del c
    llama_types = tensor_types(llama_path)
    speed = {who: [] for who in files}
    for _ in range(2):  # alternate the files so that background load hits them alike; keep the best
        for who, (path, _, _) in files.items():
            speed[who].append(runner("speed", str(path), threads=a.threads))
    rows = []
    for who, (path, seconds, own) in files.items():
        same = tensor_types(path) == llama_types
        r = runner("ppl", str(path), str(WORK / "windows.npy"), *bos_args, threads=a.threads)
        dec = max(s["best_decode_tok_s"] for s in speed[who])
        pre = max(s["best_prefill_tok_s"] for s in speed[who])
        rows.append((ftype, who, "yes" if same else "NO", f"{mb(path):.1f}", f"{r['ppl']:.3f}",
                     f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%", "" if own is None else f"{own:.3f}",
                     f"{dec:.1f}", f"{pre:.0f}", f"{seconds:.0f}"))
        log.info("%s", rows[-1])
    return rows


def report(rows, ref, n_calib, n_windows, threads) -> str:
    from frugal.report.table import table

    head = ["file type", "quantized by", "same tensor types as llama.cpp", "MB", "ppl (llama.cpp)", "vs F32",
            "ppl (frugal, PyTorch)", "decode tok/s", "prefill tok/s", "quantize s"]
    return (f"Default model (SmolLM2-135M-Instruct, dequantized to a float32 GGUF = the source of every row). "
            f"Perplexity computed by llama.cpp (llama-cpp-python 0.3.36, CPU, {threads} threads) on "
            f"{n_windows} windows x 512 tokens of wikitext-2 test ({n_windows * 511} scored tokens, frugal's protocol); frugal's own PyTorch perplexity of the same weights beside it. "
            f"frugal calibrates on {n_calib} x 512 tokens of wikitext-2 valid; llama.cpp has no importance "
            f"matrix (its default). Speed: llama.cpp, 256-token prompt then 64 greedy tokens, best of 2 x 3 runs "
            f"(after a warm-up each), the files alternating. 'quantize s' is wall time of the whole quantization "
            f"(frugal: calibration forward passes included).\n\n```\n{table(head, rows)}\n```\n")


if __name__ == "__main__":
    main()
