"""`frugal analyze`: per-layer sensitivity to each candidate format, or per operator class (--ops)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_analyze(a: argparse.Namespace) -> int:
    from frugal.api import sensitivity
    from frugal.calibrate import default_text, from_text
    from frugal.load.model import load_model
    from frugal.report.table import table
    from frugal.analysis.report import expert_table, format_table, top_layers, write

    out = Path(a.output) if a.output else None
    if out:
        from frugal.atomic import check_output_dir

        check_output_dir(out, a.overwrite, sources=(a.model,))
    loaded = load_model(a.model)
    samples = from_text(loaded.tokenizer, default_text(), a.samples, a.calib_len, a.seed)
    if a.ops:
        return _analyze_ops(a, loaded, samples, out)
    analysis, cached = sensitivity(loaded.model, loaded.source, loaded.tokenizer, samples, a.formats, a.measure,
                                   a.method, a.hessian_samples, a.seed)
    print(table(*format_table(analysis)))
    print()
    print(table(*top_layers(analysis, analysis.measured[0])))
    experts = expert_table(analysis)
    if experts[1]:  # a MoE model: routed frequency per expert (each expert layer's `routed` in analysis.json)
        print()
        print(table(*experts))
    secs = analysis.seconds
    print(f"\nanalysis time: {secs['cache_and_hessians'] + secs['layers']:.0f} s"
          f"{' (cached result)' if cached else ''}; {len(analysis.layers)} layers, "
          f"{analysis.calibration['num_samples']} x {analysis.calibration['seq_len']} calibration tokens")
    if out:
        from frugal.atomic import atomic_dir

        with atomic_dir(out, a.overwrite) as tmp:
            write(analysis, tmp)
        print(f"wrote {out}/analysis.json and {out}/heatmap.svg")
    return 0


def _analyze_ops(a: argparse.Namespace, loaded, samples, out: Path | None) -> int:
    """`frugal analyze --ops`: which operator classes amplify low-precision floating-point error."""
    from frugal.analysis.ops import DEFAULT_FORMATS as OP_FORMATS, op_sensitivity
    from frugal.api import write_ops

    formats = a.ops_formats.split(",") if a.ops_formats else OP_FORMATS
    classes = a.ops_classes.split(",") if a.ops_classes else None
    res = op_sensitivity(loaded.model, samples, formats, classes, per_block=a.ops_per_block)
    print(res.table())
    if a.ops_per_block:
        print()
        print(res.per_block_table())
    if out:
        from frugal.atomic import atomic_dir

        with atomic_dir(out, a.overwrite) as tmp:
            write_ops(res, tmp, a.ops_per_block)
        print(f"wrote {out}/op_sensitivity.json and {out}/op_sensitivity.md")
    return 0
