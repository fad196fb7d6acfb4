"""GPTQ against RTN on the default model: same calibration tokens, same evaluation tokens.

    .venv/bin/python bench/gptq_vs_rtn.py            # 128 x 512 calibration, 40 windows of 512
    .venv/bin/python bench/gptq_vs_rtn.py --quick    # 16 x 512 calibration, 8 windows (minutes)

Prints a table and rewrites the `gptq-vs-rtn` section of docs/benchmarks.md.
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

CONFIGS = [  # (bits, group_size, symmetric)
    (4, 64, True),
    (3, 64, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small calibration and evaluation (smoke run)")
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    import frugal
    from frugal.calibrate import from_text
    from frugal.evaluation.metrics import Protocol, evaluate
    from frugal.load.model import load_model, shared_dir
    from frugal.report.table import table

    transformers.logging.set_verbosity_error()
    samples, windows = (16, 8) if a.quick else (128, 40)
    loaded = load_model(a.model)
    calib = from_text(loaded.tokenizer, shared_dir() / "data/wikitext-2/valid.txt", samples, 512, seed=0)
    protocol = Protocol(text=str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), seq_len=512,
                        max_tokens=512 * windows)
    models, meta = {}, {}
    for bits, gs, sym in CONFIGS:
        for method in ("rtn", "gptq"):
            name = f"{method} W{bits} g{gs}{'' if sym else ' asym'}"
            recipe = frugal.Recipe.from_dict({"method": method, "weights": {"bits": bits, "group_size": gs, "symmetric": sym},
                                              "calibration": {"num_samples": samples, "seq_len": 512}})
            t0 = time.perf_counter()
            res = frugal.compress(loaded.model, recipe, calib, tokenizer=loaded.tokenizer)
            meta[name] = {"method": method, "bits": bits, "group_size": gs, "symmetric": sym,
                          "seconds": time.perf_counter() - t0,
                          "quantized_bytes": sum(q.nbytes() for q in res.quantized.values())}
            models[name] = res.model
    results = evaluate(models, loaded.tokenizer, protocol, ref=loaded.model, ref_name="original (float)")
    ref = results[0]
    rows = [(r.name, f"{r.ppl:.3f}", f"{100 * (r.ppl / ref.ppl - 1):+.1f}%",
             "" if r.kl is None else f"{r.kl:.4f}", "" if r.top1 is None else f"{100 * r.top1:.1f}%",
             f"{meta[r.name]['seconds']:.0f}" if r.name in meta else "",
             f"{meta[r.name]['quantized_bytes'] / 1e6:.1f}" if r.name in meta else "") for r in results]
    headers = ["model", "ppl", "ppl vs float", "KL (nats/tok)", "top-1", "compress s", "linear MB"]
    text = table(headers, rows)
    print(text)
    out = {"samples": samples, "protocol": protocol.__dict__, "torch_threads": torch.get_num_threads(),
           "results": [r.to_dict() | meta.get(r.name, {}) for r in results]}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"gptq_vs_rtn{'-quick' if a.quick else ''}.json").write_text(json.dumps(out, indent=2) + "\n")
    if not a.no_docs and not a.quick:
        cmd = "make setup && .venv/bin/python bench/gptq_vs_rtn.py"
        body = (f"Default model (SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF to float32), calibration "
                f"{samples} x 512 tokens of wikitext-2 `valid.txt` (seed 0), evaluation on the first "
                f"{ref.tokens + windows} tokens of wikitext-2-raw test in {windows} windows of 512 "
                f"(protocol in docs/evaluation.md), {torch.get_num_threads()} CPU threads.\n\n"
                + _markdown(headers, rows))
        write_section(ROOT / "docs" / "benchmarks.md", "gptq-vs-rtn", "GPTQ vs RTN on the default model", cmd, body)


def _markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
