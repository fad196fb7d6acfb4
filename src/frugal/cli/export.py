"""`frugal export`: write a compressed (compressed-tensors) directory in another format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_export(a: argparse.Namespace) -> int:
    import frugal
    from frugal.report.table import fmt_bytes, table
    from frugal.evaluation.sizes import saved_bytes

    out = frugal.export(a.compressed, a.format, a.output, overwrite=a.overwrite)
    rows = [("source", str(a.compressed), fmt_bytes(saved_bytes(Path(a.compressed))))]
    rows.append((a.format, str(out), fmt_bytes(saved_bytes(out))))
    print(table(["", "directory", "weights"], rows))
    meta = out / "frugal.json"
    gguf = json.loads(meta.read_text()).get("gguf") if meta.is_file() else None  # the GGUF exporter's record
    if gguf is not None:
        recs = gguf["tensors"].values()
        inexact = [r for r in recs if not r["exact"]]
        worst = max((r["rel_error"] for r in inexact), default=0.0)
        print(f"GGUF: {len(recs) - len(inexact)} of {len(recs)} tensors exact; largest relative change {worst:.2e}"
              " (per tensor in frugal.json)")
    return 0
