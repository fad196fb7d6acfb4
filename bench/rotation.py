"""Rotation (frugal.compression.transforms.rotation) on the default model: RTN/GPTQ at W4/W3 g64, sym/asym, with and without a
fused Hadamard rotation. Calibration 32 x 512 of wikitext-2 valid.txt (seed 0); evaluation on the first
16 windows x 512 tokens of wikitext-2-raw test (frugal.evaluation.metrics protocol).

    .venv/bin/python bench/rotation.py hadamard     # ~90 min on a shared 2-core CPU (8 GPTQ runs)

Prints one line per model and writes bench/results/rotation-<kind>.json; the table in docs/benchmarks.md
(`rotation`) was made from that file."""

import copy, json, logging, sys, time

import torch
import transformers

import frugal
from frugal.calibrate import from_text
from frugal.evaluation.metrics import Protocol, evaluate
from frugal.load.model import load_model, shared_dir
from frugal.compression.transforms.rotation import RotationOptions, rotate_model, incoherence

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
transformers.logging.set_verbosity_error()
kind = sys.argv[1] if len(sys.argv) > 1 else "hadamard"
loaded = load_model(None)
tok, orig = loaded.tokenizer, loaded.model
calib = from_text(tok, shared_dir() / "data/wikitext-2/valid.txt", 32, 512, seed=0)
protocol = Protocol(text=str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), seq_len=512, max_tokens=512 * 16)
t0 = time.perf_counter()
rot = copy.deepcopy(orig)
info = rotate_model(rot, RotationOptions(kind=kind, seed=0, per_head=True))
print("rotation", info, f"{time.perf_counter() - t0:.1f}s", flush=True)

def block_inc(m):
    return float(torch.cat([incoherence(x.weight) for n, x in m.named_modules()
                            if isinstance(x, torch.nn.Linear) and ".layers." in n]).mean())
print("mean max|w|/rms per row (block linears): orig %.3f rotated %.3f" % (block_inc(orig), block_inc(rot)), flush=True)

rows = []
def run(models):
    res = evaluate(models, tok, protocol, ref=orig, ref_name="original (float)")
    for r in res[1:]:
        rows.append(r.to_dict())
        print(f"{r.name:28s} ppl {r.ppl:8.3f}  KL {r.kl:.4f}  top1 {100*r.top1:.1f}%", flush=True)
    return res

res = run({"rotated float": rot})
print(f"{'original (float)':28s} ppl {res[0].ppl:8.3f}", flush=True)
rows.insert(0, res[0].to_dict())
for bits in (4, 3):
    for sym in (True, False):
        models = {}
        for method in ("rtn", "gptq"):
            recipe = frugal.Recipe.from_dict({"method": method, "weights": {"bits": bits, "group_size": 64, "symmetric": sym},
                                              "calibration": {"num_samples": 32, "seq_len": 512}})
            for tag, m in (("", orig), (" +rot", rot)):
                t = time.perf_counter()
                models[f"{method} W{bits} g64{'' if sym else ' asym'}{tag}"] = frugal.compress(m, recipe, calib, tokenizer=tok).model
                print("compressed", method, bits, sym, tag, f"{time.perf_counter() - t:.0f}s", flush=True)
        run(models)
        del models
from pathlib import Path

out = Path(__file__).resolve().parent / "results" / f"rotation-{kind}.json"
out.write_text(json.dumps(rows, indent=1) + "\n")
