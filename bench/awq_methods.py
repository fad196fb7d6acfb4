"""RTN / HQQ / AWQ+RTN / GPTQ / AWQ+GPTQ, each optionally + block-wise refinement, on the default model:
ppl on 16 x 512 tokens of wikitext-2-raw test, calibration 32 x 512 tokens of wikitext-2 valid.txt (seed 0).

    .venv/bin/python bench/awq_methods.py bench/results/awq-methods.jsonl W4g64asym:gptq W4g64asym:awq(scales)+gptq ...

Each CONFIG is <scheme>:<variant> (schemes W4g64sym, W3g64asym, ...; variants in VARIANTS) or `float`;
a "+refine" variant takes refine options after "@", e.g. W3g64asym:gptq+refine@lr=0.0025,iters=100,scales=false;
one JSON line per config is appended to the output file. The table in docs/benchmarks.md (`quality-methods`)
was made from bench/results/awq-methods.jsonl (runs shared the 2 cores with other jobs: times are ceilings)."""
import json, logging, sys, time
import torch, transformers
import frugal
from frugal.calibrate import from_text, default_text
from frugal.evaluation.metrics import Protocol, evaluate
from frugal.load.model import load_model, shared_dir

transformers.logging.set_verbosity_error()
logging.basicConfig(level=logging.WARNING)
VARIANTS = {"rtn": ("rtn", {}), "awq+rtn": ("rtn", {"enabled": True}), "gptq": ("gptq", {}),
            "awq+gptq": ("gptq", {"enabled": True}), "awq(scales)+gptq": ("gptq", {"enabled": True, "clip": False}),
            "awq(scales)+rtn": ("rtn", {"enabled": True, "clip": False}), "hqq": ("hqq", {})}
VARIANTS.update({f"{k}+refine": v for k, v in list(VARIANTS.items())})


def refine_options(variant: str) -> dict:
    """{"enabled": True, ...options after "@"} for a "+refine" variant, {} otherwise."""
    name, _, opts = variant.partition("@")
    if not name.endswith("+refine"):
        return {}
    out = {"enabled": True}
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), float(v) if "." in v else int(v) if v.isdigit() else v)
    return out


loaded = load_model(None)
calib = from_text(loaded.tokenizer, default_text(), 32, 512, seed=0)
protocol = Protocol(text=str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), seq_len=512, max_tokens=512 * 16)
out = sys.argv[1]
for spec in sys.argv[2:]:  # e.g. W4g64sym:rtn, or float
    if spec == "float":
        r = evaluate({spec: loaded.model}, loaded.tokenizer, protocol)[0]
        print(json.dumps({"spec": spec, "ppl": r.ppl, "tokens": r.tokens}), flush=True)
        continue
    scheme, variant = spec.split(":")
    bits, gs, sym = int(scheme[1]), int(scheme[3:].rstrip("asym").rstrip("sy")), scheme.endswith("sym") and not scheme.endswith("asym")
    method, awq = VARIANTS[variant.partition("@")[0]]
    recipe = {"method": method, "weights": {"bits": bits, "group_size": gs, "symmetric": sym}, "awq": awq,
              "refine": refine_options(variant), "calibration": {"num_samples": 32, "seq_len": 512}}
    t0 = time.perf_counter()
    res = frugal.compress(loaded.model, recipe, calib, tokenizer=loaded.tokenizer)
    secs = time.perf_counter() - t0
    r = evaluate({spec: res.model}, loaded.tokenizer, protocol)[0]
    row = {"spec": spec, "ppl": r.ppl, "tokens": r.tokens, "seconds": secs, "threads": torch.get_num_threads()}
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    del res
