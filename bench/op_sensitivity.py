"""Per-operator floating-point error on the default model: which op classes amplify rounding error.

    OMP_NUM_THREADS=1 .venv/bin/python bench/op_sensitivity.py            # ~5 minutes single-threaded
    OMP_NUM_THREADS=1 .venv/bin/python bench/op_sensitivity.py --no-per-block --no-docs

4 x 128 calibration tokens (wikitext-2 valid, seed 0); every operator class in every block rounded to
bf16, fp16, FP8 E4M3 and E5M2 in turn (frugal.analysis.ops); then, for the worst format, one class in
one block at a time on the first sample. Prints the tables and replaces the generated section of
docs/op-sensitivity.md (the interpretation above it is written by hand).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import write_section  # noqa: E402

DOC = ROOT / "docs" / "op-sensitivity.md"


def body(res, load_s: float, total_s: float, a) -> str:
    """The generated part of the doc: tables, ranking by amplification, time."""
    worst = max(res.formats, key=lambda f: sum(r.kl for r in res.rows if r.fmt == f))
    ranked = sorted((r for r in res.rows if r.fmt == worst), key=lambda r: -(r.amplification or 0))
    rank = ", ".join(f"{r.cls} {r.amplification:.2f}" for r in ranked if r.amplification is not None)
    text = (f"{a.samples} samples x {a.seq_len} tokens (wikitext-2 valid, seed {a.seed}); one forward per "
            f"(class, format) plus the exact one; single thread. Time: {res.seconds['classes']:.0f} s for the "
            f"classes, {res.seconds['per_block']:.0f} s for the per-block runs, {total_s:.0f} s in all (model load "
            f"{load_s:.0f} s).\n\n{res.table()}\n\nAmplification at {worst}, largest first: {rank}.\n")
    if res.per_block:
        text += (f"\nKL (nats/token) with one class rounded to {res.per_block_format} in one block only "
                 f"({res.calibration['per_block_samples']} sample):\n\n{res.per_block_table()}\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-block-samples", type=int, default=1)
    ap.add_argument("--no-per-block", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from frugal.calibrate import default_text, from_text
    from frugal.load.model import load_model
    from frugal.analysis.ops import op_sensitivity

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded = load_model("default")
    load_s = time.perf_counter() - t0
    samples = from_text(loaded.tokenizer, default_text(), a.samples, a.seq_len, a.seed)
    res = op_sensitivity(loaded.model, samples, per_block=not a.no_per_block, per_block_samples=a.per_block_samples)
    text = body(res, load_s, time.perf_counter() - t0, a)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(res.to_dict(), indent=1) + "\n")
    if not a.no_docs:
        cmd = "OMP_NUM_THREADS=1 .venv/bin/python bench/op_sensitivity.py"
        cmd += " --no-per-block" if a.no_per_block else ""
        write_section(DOC, "op-sensitivity", "Measured: SmolLM2-135M (default model)", cmd, text)


if __name__ == "__main__":
    main()
