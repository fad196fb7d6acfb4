"""The GPU check (run it whenever a GPU is lent; a few minutes): GPTQ W4 and AWQ + GPTQ on the default model,
compressed on the CPU and on the accelerator from the same calibration ids; reports each run's time, the
share of integer codes that agree, and the KL divergence, top-1 agreement and perplexity of the
accelerator's result against the CPU's on the same evaluation windows. Writes bench/results/gpu_check.json
(and with --out DIR a copy there, for the device tool's $OUT) and the docs/benchmarks.md section.

    python bench/gpu_check.py                     # cuda if present, else a CPU-only dry run
    python bench/gpu_check.py --samples 8 --windows 2 --device cpu   # the quick self-test
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "gptq W4 g64": {"method": "gptq", "weights": {"bits": 4, "group_size": 64}},
    "awq + gptq W4 g64 asym": {"method": "gptq", "weights": {"bits": 4, "group_size": 64, "symmetric": False},
                               "awq": {"enabled": True, "clip": False}},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compress_on(model, recipe: dict, ids: torch.Tensor, device: torch.device):
    """(Compressed on `device`, seconds); the float model is copied, so it stays as it was."""
    import frugal

    m = copy.deepcopy(model).to(device)
    _sync(device)
    t0 = time.perf_counter()
    res = frugal.compress(m, recipe, ids.to(device), inplace=True)
    _sync(device)
    return res, time.perf_counter() - t0


@torch.no_grad()
def compare(a, b, windows: torch.Tensor, device: torch.device) -> dict:
    """KL(P_a || P_b), top-1 agreement and both perplexities on (n, L) windows, evaluated on `device`."""
    ma, mb = a.model.to(device), b.model.to(device)
    kl = agree = nll_a = nll_b = 0.0
    n = 0
    for w in windows:
        x = w[None].to(device)
        la = torch.log_softmax(ma(x, use_cache=False).logits[0, :-1].double(), -1)
        lb = torch.log_softmax(mb(x, use_cache=False).logits[0, :-1].double(), -1)
        t = x[0, 1:]
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        nll_a -= float(la.gather(1, t[:, None]).sum())
        nll_b -= float(lb.gather(1, t[:, None]).sum())
        n += t.numel()
    codes = [(a.quantized[k].q.cpu() == b.quantized[k].q.cpu()).float().mean().item() for k in a.quantized]
    return {"kl": kl / n, "top1": agree / n, "ppl_cpu": float(torch.exp(torch.tensor(nll_a / n))),
            "ppl_device": float(torch.exp(torch.tensor(nll_b / n))), "codes_equal": sum(codes) / len(codes), "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    ap.add_argument("--out", default=None, help="also copy the JSON result into this directory")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from frugal.calibrate import default_text, from_text
    from frugal.evaluation.metrics import windows
    from frugal.api import eval_protocol
    from frugal.load.model import load_model

    device = torch.device(a.device)
    loaded = load_model(None)
    ids = from_text(loaded.tokenizer, default_text(), a.samples, 512, seed=0)
    wins, _ = windows(loaded.tokenizer, eval_protocol(None, 512, 512 * a.windows))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_threads": torch.get_num_threads(), "samples": a.samples, "torch": torch.__version__, "runs": {}}
    for name, recipe in RECIPES.items():
        recipe = {**recipe, "calibration": {"num_samples": a.samples, "seq_len": 512}}
        cpu, t_cpu = compress_on(loaded.model, recipe, ids, torch.device("cpu"))
        dev, t_dev = compress_on(loaded.model, recipe, ids, device)
        info["runs"][name] = {"cpu_s": t_cpu, "device_s": t_dev, **compare(cpu, dev, wins, device)}
        logging.info("%s: %s", name, info["runs"][name])
        del cpu, dev
    text = json.dumps(info, indent=2) + "\n"
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "gpu_check.json").write_text(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_check.json").write_text(text)
    rows = ["| recipe | CPU s | device s | speed-up | codes equal | KL(cpu ‖ device) | top-1 | ppl CPU | ppl device |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {k} | {r['cpu_s']:.0f} | {r['device_s']:.0f} | {r['cpu_s'] / r['device_s']:.1f}x | "
             f"{100 * r['codes_equal']:.2f}% | {r['kl']:.2e} | {100 * r['top1']:.1f}% | {r['ppl_cpu']:.3f} | "
             f"{r['ppl_device']:.3f} |" for k, r in info["runs"].items()]
    body = (f"Device: {info['device']}; CPU threads {info['cpu_threads']}; {a.samples} x 512 calibration tokens; "
            f"{a.windows} evaluation windows of 512 of wikitext-2-raw test.\n\n" + "\n".join(rows) + "\n")
    publish("gpu-check", "GPU check: the same compression on CPU and accelerator", "bench/gpu_check.py",
            sys.argv[1:], body, not a.no_docs)


if __name__ == "__main__":
    main()
