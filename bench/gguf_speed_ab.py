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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_vs_llamacpp import ensure_venv, runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", action="store_true", help="write the `gguf-speed` section of docs/benchmarks.md")
    a = ap.parse_args()
    ensure_venv()
    runs: dict[str, list[dict]] = {f: [] for f in a.files}
    for _ in range(a.rounds):
        for f in a.files:
            runs[f].append(runner("speed", f, threads=a.threads))
    rows = []
    for f, rs in runs.items():
        dec = [r["decode_tok_s"] for r in rs]
        pre = [r["prefill_tok_s"] for r in rs]
        rows.append((str(Path(f).resolve().relative_to(ROOT)) if Path(f).resolve().is_relative_to(ROOT) else f,
                     f"{statistics.median(dec):.1f}", f"{max(r['best_decode_tok_s'] for r in rs):.1f}",
                     f"{statistics.median(pre):.0f}", f"{max(r['best_prefill_tok_s'] for r in rs):.0f}"))
    from frugal.report.table import table

    text = table(["file", "decode tok/s (median)", "decode (best)", "prefill tok/s (median)", "prefill (best)"], rows)
    print(text)
    if a.docs:
        from common import write_section

        body = (f"llama.cpp (llama-cpp-python 0.3.36, {a.threads} threads), {a.rounds} rounds, the files alternating; "
                f"each round: warm-up, then 3 runs of a 256-token prompt and 64 greedy tokens.\n\n```\n{text}\n```\n")
        write_section(ROOT / "docs" / "benchmarks.md", "gguf-speed", "GGUF decode speed, side by side",
                      f".venv/bin/python bench/gguf_speed_ab.py {' '.join(a.files)} --rounds {a.rounds} --docs", body)


if __name__ == "__main__":
    main()
