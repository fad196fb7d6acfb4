"""Do two frugal trees write the same bytes? Every benchmark recipe, on tiny models of every tested family
(and, with --default-model, on the default model), through the `frugal compress` command of each tree.

    python bench/byte_identity.py --src /path/to/old/src --json old.json      # record one tree
    python bench/byte_identity.py --json new.json --compare old.json          # record this tree, compare

A run records the sha256 of every output file (or the one-line error a refusal gives) per
(model, recipe, format). Refusals must match too: the same message for the same input.
The tiny models are built once into --models (default bench/.work/identity-models) and reused, so both
trees read the very same files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "opt")
FAST = ["--samples", "6", "--calib-len", "32"]  # calibration small enough for tiny models, same in both trees

# name -> (frugal compress options, formats written)
RECIPES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "rtn-w4g64": (["--method", "rtn", "--bits", "4", "--group-size", "64"], ("compressed-tensors", "gptq")),
    "rtn-w4g32-asym-clip": (["--method", "rtn", "--bits", "4", "--group-size", "32", "--asym", "--mse-clip"],
                            ("compressed-tensors",)),
    "gptq-w4g64": (["--method", "gptq", "--bits", "4", "--group-size", "64"], ("compressed-tensors",)),
    "gptq-w3g64-asym": (["--method", "gptq", "--bits", "3", "--group-size", "64", "--asym"], ("compressed-tensors",)),
    "gptq-w8-channel-noact": (["--method", "gptq", "--bits", "8", "--group-size", "-1", "--no-act-order"],
                              ("compressed-tensors",)),
    "gptq-w4g32-fp16": (["--method", "gptq", "--bits", "4", "--group-size", "32", "--scale-dtype", "float16"],
                        ("compressed-tensors", "gptq", "gguf", "onnx")),
    "gptq-w2g32-asym": (["--method", "gptq", "--bits", "2", "--group-size", "32", "--asym"], ("compressed-tensors",)),
    "hqq-w3g64": (["--method", "hqq", "--bits", "3", "--group-size", "64", "--asym"], ("compressed-tensors",)),
    "awq-rtn-w4g64": (["--method", "rtn", "--bits", "4", "--group-size", "64", "--awq"], ("compressed-tensors",)),
    "awq-gptq-w4g64-asym": (["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym", "--awq-no-clip"],
                            ("compressed-tensors",)),
    "rot-gptq-w4g64": (["--method", "gptq", "--bits", "4", "--group-size", "64", "--rotate", "hadamard"],
                       ("compressed-tensors",)),
    "rot-awq-gptq-refine": (["--method", "gptq", "--bits", "3", "--group-size", "64", "--asym", "--rotate",
                             "hadamard", "--awq-no-clip", "--refine", "--refine-iters", "6"], ("compressed-tensors",)),
    "awq-gptq-refine-norms": (["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym", "--awq-no-clip",
                               "--refine-norms", "--refine-iters", "6"], ("compressed-tensors",)),
    "hqq-refine": (["--method", "hqq", "--bits", "4", "--group-size", "32", "--refine", "--refine-iters", "6"],
                   ("compressed-tensors",)),
    "gguf-q4km-gptq": (["--method", "gptq", "--gguf-type", "Q4_K_M"], ("gguf",)),
    "gguf-q4_0-rtn": (["--method", "rtn", "--gguf-type", "Q4_0"], ("gguf",)),
    "gguf-q8_0-gptq": (["--method", "gptq", "--gguf-type", "Q8_0"], ("gguf",)),
    "budget-3.5bpw-rtn": (["--method", "rtn", "--budget", "3.5bpw"], ("compressed-tensors",)),
    "budget-4.25bpw-gptq": (["--method", "gptq", "--budget", "4.25bpw"], ("compressed-tensors",)),
    "stream-rtn-w4g64": (["--method", "rtn", "--bits", "4", "--group-size", "64", "--stream"],
                         ("compressed-tensors",)),
    "stream-gptq-w4g64-asym": (["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym", "--stream"],
                               ("compressed-tensors",)),
    "stream-awq-gptq": (["--method", "gptq", "--bits", "4", "--group-size", "64", "--awq-no-clip", "--stream"],
                        ("compressed-tensors",)),
    "stream-hqq": (["--method", "hqq", "--bits", "4", "--group-size", "64", "--stream"], ("compressed-tensors",)),
}
DEFAULT_MODEL_RECIPES = ("rtn-w4g64", "gptq-w4g64", "awq-gptq-w4g64-asym", "hqq-w3g64", "gguf-q4km-gptq",
                         "stream-rtn-w4g64")


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def build_models(dest: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model  # the test suite's tiny models

    out = {}
    for fam in FAMILIES:
        d = dest / fam
        if not (d / "config.json").is_file():
            build_tiny_model(fam, d)
        out[fam] = d
    return out


def run_one(main, model: Path | None, options: list[str], fmt: str, out: Path) -> dict:
    argv = ["-q", "compress"] + ([str(model)] if model else []) + options + ["--format", fmt, "-o", str(out),
                                                                           "--no-eval", "--overwrite"]
    argv += FAST
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    if rc:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("frugal: error")]
        return {"error": lines[-1] if lines else f"exit {rc}"}
    files = digest(out)
    files.pop("analysis.json", None)
    return {"files": files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="the src/ folder of the frugal tree to run (default: this one)")
    ap.add_argument("--json", required=True, help="write the digests here")
    ap.add_argument("--compare", help="digests of another tree to compare with")
    ap.add_argument("--models", default=str(ROOT / "bench/.work/identity-models"))
    ap.add_argument("--work", default=str(ROOT / "bench/.work/identity-out"))
    ap.add_argument("--default-model", action="store_true", help="also the default model (minutes per recipe)")
    ap.add_argument("--only", help="comma-separated recipe names")
    ap.add_argument("--default-only", help="recipes run on the default model (default: a cheap set)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(a.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    os.environ["FRUGAL_CACHE"] = str(work / "cache")  # fresh: no analysis reused from the other tree
    models = build_models(Path(a.models))
    if a.src:
        sys.path.insert(0, str(Path(a.src).resolve()))
    try:
        from frugal.cli.main import main as frugal_main  # stage folders
    except ImportError:
        from frugal.cli import main as frugal_main  # the flat package before them
    import frugal

    print(f"frugal from {Path(frugal.__file__).parent}", file=sys.stderr)
    names = a.only.split(",") if a.only else list(RECIPES)
    jobs = [(fam, path, r) for r in names for fam, path in models.items()]
    if a.default_model:
        chosen = a.default_only.split(",") if a.default_only else DEFAULT_MODEL_RECIPES
        jobs += [("default", None, r) for r in chosen if r in names]
    results: dict[str, dict] = {}
    for fam, path, r in jobs:
        options, formats = RECIPES[r]
        for fmt in formats:
            key = f"{fam}/{r}/{fmt}"
            t0 = time.perf_counter()
            results[key] = run_one(frugal_main, path, options, fmt, work / key.replace("/", "_"))
            print(f"{key}: {'error' if 'error' in results[key] else 'ok'} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
    Path(a.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not a.compare:
        return 0
    old = json.loads(Path(a.compare).read_text())
    diff = [k for k in sorted(set(old) & set(results)) if old[k] != results[k]]
    for k in diff:
        print(f"DIFFERENT {k}: {old[k]} != {results[k]}")
    same = len(set(old) & set(results)) - len(diff)
    refusals = sum("error" in results[k] for k in set(old) & set(results) if k not in diff)
    print(f"{same} identical ({refusals} of them the same refusal), {len(diff)} different")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
