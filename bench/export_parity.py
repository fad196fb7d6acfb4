"""One compression, four engines: the default model compressed once to 4 bits and exported to
compressed-tensors, GPTQ, GGUF and ONNX; each file run by the engine that loads it, on the same tokens.

    .venv/bin/python bench/export_parity.py            # 128 x 512 calibration, 40 windows of 512 tokens
    .venv/bin/python bench/export_parity.py --quick    # 16 x 512 calibration, 8 windows

GPTQ W4 g64 symmetric with float16 scales (the grid every format holds exactly: GGUF as Q4_0 blocks).
Perplexity on frugal's protocol from: frugal (PyTorch, the in-memory model), ONNX Runtime (the ONNX
file), llama.cpp (the GGUF file, bench/.venvs/llama-cpp), transformers + compressed-tensors (the
compressed-tensors directory); logits of transformers + GPTQModel (the GPTQ directory, in
bench/.venvs/gptqmodel via bench/gptq_reload.py) against frugal's on 256 tokens. Rewrites the
`export-parity` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import write_section  # noqa: E402

WORK = ROOT / "bench" / ".work" / "parity"
log = logging.getLogger("bench")


class OrtAsModel:
    """ONNX Runtime behind the `model(ids, use_cache=False).logits` interface frugal's evaluation uses."""

    def __init__(self, directory: Path, threads: int):
        import torch

        from frugal.exporters.onnx_runtime import OrtCausalLM

        self.ort = OrtCausalLM(directory, threads=threads)
        self._p = torch.zeros(1)

    def parameters(self):
        return iter([self._p])

    def __call__(self, ids, use_cache=False):
        return SimpleNamespace(logits=self.ort.logits(ids))


def torch_pass(model, wins, bos):
    """Perplexity and per-position argmax of a PyTorch model on the windows (frugal's protocol)."""
    import math

    import torch

    from frugal.evaluation.metrics import _logprobs

    nll, count, argmax = 0.0, 0, []
    with torch.no_grad():
        for w in wins:
            lp, targets = _logprobs(model, w, bos)
            nll -= lp.gather(1, targets[:, None]).sum().item()
            count += targets.numel()
            argmax.append(lp.argmax(-1))
    return math.exp(nll / count), argmax


def agreement(a: list, b: list) -> float:
    import torch

    same = sum(int((torch.as_tensor(x) == torch.as_tensor(y)).sum()) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)


def gptq_reload(c, directory: Path, tokenizer) -> dict:
    """transformers + GPTQModel reload of the GPTQ directory, logits against frugal's (256 tokens)."""
    import torch
    from safetensors.torch import save_file

    import gptq_reload as gr
    from frugal.load.model import shared_dir

    text = (shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw").read_text()[:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        logits = c.model(ids).logits.float()
    mods = dict(c.model.named_modules())
    ref = {"ids": ids, "logits": logits.contiguous(),
           **{f"weight.{n}": mods[n].weight.detach().float().contiguous() for n in c.quantized}}
    save_file(ref, str(directory.parent / f"{directory.name}.ref.safetensors"))
    return gr.run_reload([directory])[0] | {"logits_max_abs": logits.abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 x 512 calibration, 8 windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np
    import torch
    import transformers

    import frugal
    from frugal.calibrate import from_text
    from frugal.evaluation.metrics import Protocol, windows
    from frugal.load.model import load_model, shared_dir
    from gguf_vs_llamacpp import WORK as GGUF_WORK, ensure_venv, runner

    torch.set_num_threads(a.threads)
    n_calib, n_tokens = (16, 4096) if a.quick else (128, 20480)
    src = load_model(None)
    calib = from_text(src.tokenizer, shared_dir() / "data" / "wikitext-2" / "valid.txt", n_calib, 512, 0)
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 64, "symmetric": True, "scale_dtype": "float16"},
              "calibration": {"num_samples": n_calib, "seq_len": 512}}
    formats = ("compressed-tensors", "gptq", "gguf", "onnx")
    t0 = time.perf_counter()
    c = frugal.compress(src.model, recipe, calib, tokenizer=src.tokenizer, inplace=True, formats=formats)
    c.report.source = str(src.source)
    log.info("compressed in %.0f s", time.perf_counter() - t0)
    for fmt in formats:
        c.save(WORK / fmt, overwrite=True, fmt=fmt)
    protocol = Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, n_tokens)
    wins, bos = windows(src.tokenizer, protocol)
    own_ppl, own_argmax = torch_pass(c.model, wins, bos)
    rows = [("frugal (PyTorch, in memory)", "-", f"{own_ppl:.3f}", "", "100%", "")]

    ort_ppl, ort_argmax = torch_pass(OrtAsModel(WORK / "onnx", a.threads), wins, bos)
    rows.append(row("ONNX Runtime 1.32 (MatMulNBits)", WORK / "onnx", ort_ppl, own_ppl, agreement(ort_argmax, own_argmax)))

    ensure_venv()
    GGUF_WORK.mkdir(parents=True, exist_ok=True)
    np.save(GGUF_WORK / "parity-windows.npy", wins.numpy())
    bos_args = [] if bos is None else ["--bos", str(bos)]
    r = runner("ppl", str(WORK / "gguf" / "model.gguf"), str(GGUF_WORK / "parity-windows.npy"), *bos_args,
               threads=a.threads)
    rows.append(row("llama.cpp 0.3.36 (GGUF Q4_0)", WORK / "gguf", r["ppl"], own_ppl, agreement(r["argmax"], own_argmax)))

    ct = transformers.AutoModelForCausalLM.from_pretrained(WORK / "compressed-tensors", dtype=torch.float32)
    ct_ppl, ct_argmax = torch_pass(ct, wins, bos)
    with torch.no_grad():
        diff = (ct(wins[:1]).logits - c.model(wins[:1]).logits).abs().max().item()
    rows.append(row("transformers + compressed-tensors", WORK / "compressed-tensors", ct_ppl, own_ppl,
                    agreement(ct_argmax, own_argmax), f"{diff:.3g}"))
    del ct

    g = gptq_reload(c, WORK / "gptq", src.tokenizer)
    auto, exact = g["auto"], g["torch"]
    rows.append(row("transformers + GPTQModel (default CPU kernel)", WORK / "gptq", None, own_ppl, None,
                    _fmt(auto, "logits_max_abs_diff")))
    rows.append(row("transformers + GPTQModel (gptq_torch, fp32 scales)", WORK / "gptq", None, own_ppl, None,
                    _fmt(exact, "logits_max_abs_diff_fp32_scales")))
    body = report(rows, n_calib, wins.shape[0], g)
    print(body)
    if not a.no_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "export-parity", "One compression, four engines",
                      f".venv/bin/python bench/export_parity.py{' --quick' if a.quick else ''}", body)


def _fmt(d: dict, key: str) -> str:
    return f"error: {d['error'][:80]}" if "error" in d else f"{d[key]:.3g}"


def row(engine: str, directory: Path, ppl, own_ppl: float, top1, diff: str = "") -> tuple:
    from frugal.evaluation.sizes import saved_bytes

    size = f"{saved_bytes(directory) / 1e6:.1f}"
    if ppl is None:
        return (engine, size, "", "", "", diff)
    return (engine, size, f"{ppl:.3f}", f"{100 * (ppl / own_ppl - 1):+.2f}%", f"{100 * top1:.2f}%", diff)


def report(rows, n_calib: int, n_windows: int, g: dict) -> str:
    from frugal.report.table import table

    head = ["engine (file)", "MB", "ppl", "vs frugal", "top-1 = frugal's", "max |Δlogit|"]
    return (f"Default model, GPTQ W4 g64 symmetric, float16 scales, {n_calib} x 512 calibration tokens, compressed "
            f"once and saved in four formats. Perplexity on {n_windows} windows x 512 tokens of wikitext-2 test "
            f"(frugal's protocol), computed by each engine; top-1 = share of positions whose argmax equals "
            f"frugal's. GPTQ reload: logits on 256 tokens against frugal's (largest |logit| "
            f"{g['logits_max_abs']:.1f}); the default kernel rounds (bfloat16 scales, float16 products), "
            f"the gptq_torch kernel with float32 scales does frugal's arithmetic.\n\n```\n{table(head, rows)}\n```\n")


if __name__ == "__main__":
    main()
