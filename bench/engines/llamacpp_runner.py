"""llama.cpp side of the GGUF benchmarks; runs in bench/.venvs/llama-cpp (llama-cpp-python, numpy).

    python llamacpp_runner.py quantize SRC.gguf DST.gguf Q4_K_M      # llama.cpp's own quantizer
    python llamacpp_runner.py ppl MODEL.gguf windows.npy [--bos ID]  # NLL on frugal's windows
    python llamacpp_runner.py speed MODEL.gguf                       # prefill and decode tokens/s

Each command prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def quantize(src: str, dst: str, ftype: str, threads: int) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return {"seconds": time.perf_counter() - t0, "ftype": ftype}


def _model(path: str, n_ctx: int, threads: int, logits_all: bool):
    import llama_cpp

    return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False,
                           n_threads=threads, n_threads_batch=threads, seed=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ppl(path: str, windows_file: str, bos: int | None, threads: int) -> dict:
    """frugal's protocol: with a BOS id every window token is scored, else all but the first."""
    wins = np.load(windows_file)
    llm = _model(path, wins.shape[1] + 1, threads, logits_all=True)
    nll, count, argmax = 0.0, 0, []
    for w in wins:
        ids = ([bos] if bos is not None else []) + w.tolist()
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids) - 1])  # predictions of tokens 1..
        lp = _log_softmax(logits)
        targets = np.array(ids[1:])
        nll -= lp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        argmax.append(logits.argmax(-1).tolist())
    return {"nll": nll / count, "ppl": float(np.exp(nll / count)), "tokens": count, "argmax": argmax}


def speed(path: str, threads: int, prompt_len: int = 256, new_tokens: int = 64, runs: int = 3) -> dict:
    """Median and best prefill and decode throughput over `runs` (after one warm-up), greedy, fixed ids."""
    llm = _model(path, prompt_len + new_tokens + 8, threads, logits_all=False)
    prompt = [(i * 37) % 1000 + 10 for i in range(prompt_len)]
    pre, dec = [], []
    for r in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(new_tokens):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if r:
            pre.append(prompt_len / (t1 - t0))
            dec.append(new_tokens / (t2 - t1))
    return {"prefill_tok_s": float(np.median(pre)), "decode_tok_s": float(np.median(dec)),
            "best_prefill_tok_s": float(max(pre)), "best_decode_tok_s": float(max(dec)), "threads": threads,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src"), q.add_argument("dst"), q.add_argument("ftype")
    p = sub.add_parser("ppl")
    p.add_argument("model"), p.add_argument("windows")
    p.add_argument("--bos", type=int, default=None)
    s = sub.add_parser("speed")
    s.add_argument("model")
    for x in (q, p, s):
        x.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "quantize":
        out = quantize(a.src, a.dst, a.ftype, a.threads)
    elif a.cmd == "ppl":
        out = ppl(a.model, a.windows, a.bos, a.threads)
    else:
        out = speed(a.model, a.threads)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
