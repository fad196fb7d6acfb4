"""Decode/prefill speed of GGUF files in llama.cpp, measured alternately so background load hits all alike.

    .venv/bin/python bench/gguf_speed_ab.py A.gguf B.gguf [...] --rounds 5

Each round runs every file once (bench/engines/llamacpp_runner.py speed: warm-up, then 3 runs); prints
the median and best over rounds per file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_vs_llamacpp import ensure_venv, runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ensure_venv()
    runs: dict[str, list[dict]] = {f: [] for f in a.files}
    for _ in range(a.rounds):
        for f in a.files:
            runs[f].append(runner("speed", f, threads=a.threads))
    for f, rs in runs.items():
        dec = [r["decode_tok_s"] for r in rs]
        pre = [r["prefill_tok_s"] for r in rs]
        print(f"{f}: decode median {statistics.median(dec):.1f} best {max(r['best_decode_tok_s'] for r in rs):.1f} "
              f"tok/s; prefill median {statistics.median(pre):.0f} best {max(r['best_prefill_tok_s'] for r in rs):.0f}")


if __name__ == "__main__":
    main()
