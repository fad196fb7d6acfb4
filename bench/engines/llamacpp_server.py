"""llama.cpp behind serve.py's line protocol, for bench/export_parity.py; runs in bench/.venvs/llama-cpp.

    python llamacpp_server.py MODEL.gguf [--threads 2]

Requests: {"cmd": "ppl", "windows": "w.npy", "bos": 1 | null} (llamacpp_runner.ppl: frugal's
protocol), {"cmd": "greedy", "prompts": [[ids]], "n": 32}, {"cmd": "speed", "prompt": [ids], "new": 64}
(prefill = until the first new token, decode = the other new - 1 tokens), {"cmd": "quit"}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_runner  # noqa: E402
import serve  # noqa: E402


class Server:
    """Two contexts: with logits_all for greedy (llama-cpp-python 0.3.36 leaves `scores` zero without it, so
    the argmax would be token 0), without for speed (as llamacpp_runner.speed: the fed tokens are then 0s,
    which costs the same per step)."""

    def __init__(self, path: str, threads: int, n_ctx: int = 1024):
        self.path, self.threads = path, threads
        self.fast = llamacpp_runner._model(path, n_ctx, threads, logits_all=False)
        self.llm = llamacpp_runner._model(path, n_ctx, threads, logits_all=True)

    def _next(self, llm=None) -> int:
        llm = llm or self.llm
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def ppl(self, windows: str, bos: int | None, out: str | None = None) -> dict:
        """`out` (where vLLM's runner writes its npz) is not used: the argmax comes back in the answer."""
        return llamacpp_runner.ppl(self.path, windows, bos, self.threads)

    def greedy(self, prompts: list[list[int]], n: int) -> dict:
        out = []
        for p in prompts:
            self.llm.reset()
            self.llm.eval(p)
            toks = [self._next()]
            while len(toks) < n:
                self.llm.eval([toks[-1]])
                toks.append(self._next())
            out.append(toks)
        return {"tokens": out}

    def speed(self, prompt: list[int], new: int) -> dict:
        llm = self.fast
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self._next(llm)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = self._next(llm)
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = serve.channel()
    import llama_cpp

    s = Server(a.model, a.threads)
    serve.loop({"ppl": s.ppl, "greedy": s.greedy, "speed": s.speed}, out,
               {"llama_cpp": llama_cpp.__version__, "threads": a.threads})


if __name__ == "__main__":
    main()
