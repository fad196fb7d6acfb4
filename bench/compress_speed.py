"""Compression time against the cost of one calibration pass, side by side in one run.

T_fwd: the fastest plain forward of the calibration set through the float model's decoder on this machine
(best of batch 1/8/32, float32 and bfloat16 autocast, each measured twice: before and after the
compressions). Then each frugal recipe (bench/peers/run_frugal.py, the peer-protocol runner) and, with
--baseline REF, the same runner on the frugal sources of git revision REF (a worktree under bench/.work),
alternating this tree and the baseline per recipe (`--repeats N`: N rounds, every other one backwards, the
fastest of each reported); the peers' GPTQ (llm-compressor, GPTQModel, their own
venvs from bench/peers.py) on the same calibration ids. Reported: each run's quantization wall time, its
ratio to T_fwd, frugal's stage times, the speed-up over the baseline and whether its saved tensors are the
same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers as P  # noqa: E402  (the peer-protocol runners, venvs, calibration file)
from common import write_section  # noqa: E402

log = logging.getLogger("compress_speed")
ROOT = P.ROOT
RESULTS = ROOT / "bench" / "results" / "compress_speed.json"
FRUGAL = ["frugal-rtn", "frugal-hqq", "frugal-gptq", "frugal-awq-gptq", "frugal-awq-gptq-refine"]
PEERS = ["llmcompressor-gptq", "gptqmodel"]
BATCHES = (1, 8, 32)


def has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPUs where bfloat16 autocast is faster than float32 (on AVX2 a batch-1 pass
    took over 4 min against float32's 86 s, so it is not measured there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def fwd_configs() -> list[tuple[int, bool]]:
    return [(b, bf16) for b in BATCHES for bf16 in ((False, True) if has_fast_bf16() else (False,))]


def forward_seconds(model, ids, batch: int, bf16: bool) -> float:
    """Wall time of the float decoder (no head) over every calibration sequence, `batch` at a time."""
    import torch

    decoder = model.get_decoder()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, ids.shape[0], batch):
            decoder(input_ids=ids[i:i + batch], use_cache=False)
    return time.perf_counter() - t0


def measure_fwd(orig: Path, calib: Path, into: dict) -> None:
    """Add one measurement of every forward configuration to `into` ({"b8 bf16": [s, ...]})."""
    from safetensors.torch import load_file

    from frugal.load.model import load_model

    ids = load_file(str(calib))["input_ids"].long()
    model = load_model(str(orig)).model
    for batch, bf16 in fwd_configs():
        key = f"batch {batch} {'bf16 autocast' if bf16 else 'float32'}"
        into.setdefault(key, []).append(forward_seconds(model, ids, batch, bf16))
        log.info("T_fwd %s: %.1f s", key, into[key][-1])


def baseline_src(ref: str) -> Path:
    """src/ of a git worktree of `ref` (made once under bench/.work/baseline-REF)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree = P.WORK / f"baseline-{sha}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True, capture_output=True)
    return tree / "src"


def run_one(key: str, orig: Path, src: Path, calib: Path, a, tag: str, frugal_src: Path | None = None) -> dict:
    """One runner; its record with the runner's result.json (quant_seconds, stages) merged in. frugal's
    runs pin weights.scale_dtype (--scale-dtype) and storage.dtype (model: float32, no 16-bit rounding),
    so that a baseline with other defaults reads the same recipe and computes the same maths."""
    import dataclasses

    peer = P.PEER_BY_KEY[key]
    if peer.venv is None:
        peer = dataclasses.replace(peer, args=[*peer.args, "--scale-dtype", a.scale_dtype, "--storage-dtype", "model"])
    out = P.WORK / f"speed-{tag}" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = P.run_peer(peer, src, orig, calib, out, a, frugal_src=frugal_src)
    result = out / "result.json"
    if result.is_file():
        rec |= {k: v for k, v in json.loads(result.read_text()).items() if k in ("quant_seconds", "stages", "error")}
    rec["out"] = str(out)
    log.info("%s (%s): quantization %.1f s%s", key, tag, rec.get("quant_seconds") or float("nan"),
             f", error: {rec['error']}" if rec.get("error") else "")
    return rec


def fastest_runs(done: dict[tuple[str, str], list[dict]], failed: dict[str, str]) -> dict:
    """Per recipe: its fastest run of this tree and of the baseline (each run's seconds kept in `all_seconds`)
    and whether the two saved the same bytes."""
    runs: dict = {}
    for (key, tag), recs in done.items():
        ok = [r for r in recs if r.get("quant_seconds")]
        best = min(ok, key=lambda r: r["quant_seconds"]) if ok else recs[-1]
        runs.setdefault(key, {})[tag] = best | {"all_seconds": [r.get("quant_seconds") for r in recs]}
    for key, rec in runs.items():
        if "baseline" in rec:
            rec["same_bytes"] = same_bytes(rec["this"], rec["baseline"])
    return runs | {key: {"this": {"error": why}} for key, why in failed.items()}


def same_bytes(a: dict, b: dict) -> bool | None:
    """Whether two runs' saved safetensors hold the same tensors bit for bit (None if either is missing)."""
    import torch
    from safetensors import safe_open

    def tensors(out: str) -> dict:
        found = {}
        for f in sorted((Path(out) / "saved").glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                found |= {k: st.get_tensor(k) for k in st.keys()}
        return found

    x, y = tensors(a["out"]), tensors(b["out"])
    if not x or not y:
        return None
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def table(fwd: dict, runs: dict, a) -> str:
    t_fwd_key = min(fwd, key=lambda k: min(fwd[k]))
    t_fwd = min(fwd[t_fwd_key])
    bf16 = "" if has_fast_bf16() else (" bfloat16 autocast not measured: this CPU has neither AVX-512 BF16 nor AMX "
                                        "(a batch-1 pass ran over 4 min against float32's 86 s).")
    lines = [f"T_fwd = {t_fwd:.1f} s ({t_fwd_key}, best of {len(next(iter(fwd.values())))} measurements); "
             f"every configuration: " + ", ".join(f"{k} {min(v):.1f} s" for k, v in fwd.items()) + "." + bf16, "",
             "| run | quantization s | / T_fwd | baseline s | speed-up | same bytes as baseline | stages (s) |",
             "|---|---|---|---|---|---|---|"]
    for key, rec in runs.items():
        q = rec["this"].get("quant_seconds")
        base = rec.get("baseline", {}).get("quant_seconds")
        stages = ", ".join(f"{k} {v:.0f}" for k, v in (rec["this"].get("stages") or {}).items())
        same = rec.get("same_bytes")
        if len(rec["this"].get("all_seconds", [])) > 1:
            stages += f" (best of {', '.join(_s(x) for x in rec['this']['all_seconds'])}" + (
                f"; baseline {', '.join(_s(x) for x in rec['baseline']['all_seconds'])})" if "baseline" in rec else ")")
        lines.append(f"| {key} | {_s(q)} | {f'{q / t_fwd:.2f}' if q else ''} | {_s(base)} | "
                     f"{f'{base / q:.2f}x' if q and base else ''} | {'' if same is None else 'yes' if same else 'no'} | "
                     f"{stages or rec['this'].get('error', '')} |")
    return "\n".join(lines)


def _s(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens (default 32)")
    ap.add_argument("--frugal", default=",".join(FRUGAL), help=f"frugal recipes (default {','.join(FRUGAL)})")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"peer runs (default {','.join(PEERS)}; '' for none)")
    ap.add_argument("--baseline", default=None, help="git revision whose frugal runs beside this tree's (e.g. a "
                    "commit before a speed change)")
    ap.add_argument("--baseline-recipes", default="frugal-gptq", help="recipes run on the baseline too (default frugal-gptq)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=60, help="minutes per run")
    ap.add_argument("--scale-dtype", default="bfloat16", help="frugal's weights.scale_dtype in every run (default "
                    "bfloat16, which frugal before recipe version 3 stored by default)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every run, alternately forwards and backwards "
                    "(the fastest of each is reported)")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    a.quick, a.autoround_iters, a.autoround_timeout = False, None, None
    a.threads = os.cpu_count() or 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    P.LOGS.mkdir(parents=True, exist_ok=True)
    from frugal.load.model import load_model

    loaded = load_model(None)
    orig = Path(loaded.path)  # the float32 directory the GGUF was dequantized into (as bench/peers.py)
    src = P.peer_source(orig)
    calib = P.calibration_file(loaded.tokenizer, a.samples, 512)
    del loaded
    t0 = time.perf_counter()
    fwd: dict = {}
    measure_fwd(orig, calib, fwd)
    base_src = baseline_src(a.baseline) if a.baseline else None
    order: list[tuple[str, str]] = []  # (recipe or peer, "this" | "baseline"), in the order of the first round
    for key in [k for k in a.frugal.split(",") if k]:
        order.append((key, "this"))
        if base_src and key in a.baseline_recipes.split(","):
            order.append((key, "baseline"))
    failed: dict[str, str] = {}
    for key in [k for k in a.peers.split(",") if k]:
        ok, why = P.ensure_venv(P.PEER_BY_KEY[key].venv)
        order += [(key, "this")] if ok else []
        failed |= {} if ok else {key: why}
    done: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.repeats):  # round 2 runs the list backwards (A B B A ...): no run always goes first
        for key, tag in order if r % 2 == 0 else order[::-1]:
            rec = run_one(key, orig, src, calib, a, tag, base_src if tag == "baseline" else None)
            done.setdefault((key, tag), []).append(rec)
    runs = fastest_runs(done, failed)
    measure_fwd(orig, calib, fwd)
    body = table(fwd, runs, a)
    print(body)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"fwd": fwd, "runs": runs, "samples": a.samples, "baseline": a.baseline,
                                   "total_seconds": time.perf_counter() - t0}, indent=2, default=str) + "\n")
    if not a.no_docs:
        cmd = "make setup && .venv/bin/python bench/compress_speed.py " + " ".join(sys.argv[1:])
        intro = (f"The default model (SmolLM2-135M-Instruct, float32), W{a.bits} g{a.group}, {a.samples} x 512 "
                 f"calibration tokens of wikitext-2 valid.txt (seed 0) for every run, one run at a time on this "
                 f"machine ({a.threads} threads). Quantization s: the runner's own timing of the library's "
                 f"quantization call (model load and save excluded), as in the peer table. frugal's runs pin "
                 f"weights.scale_dtype={a.scale_dtype} and storage.dtype=model (float32 files), which every "
                 f"compared version reads alike. Baseline: the same runner on frugal at {a.baseline or '(none)'}.\n\n")
        write_section(ROOT / "docs" / "benchmarks.md", "compress-speed", "Compression time against one calibration pass",
                      cmd, intro + body)


if __name__ == "__main__":
    main()
