"""`frugal eval`: evaluate models side by side on the same tokens (results.json, report.html)."""

from __future__ import annotations

import argparse


def cmd_eval(a: argparse.Namespace) -> int:
    from frugal.api import eval_protocol, suite_options, write_results
    from frugal.atomic import check_output_dir
    from frugal.evaluation.suite import run_suite

    if a.full:
        a.eval_tokens, a.task_limit = 10**9, 0
    opts = suite_options(eval_protocol(a.text, a.seq_len, a.eval_tokens), a.tasks, a.task_limit, a.speed, a.generate)
    if a.output:
        check_output_dir(a.output, overwrite=True, sources=(*a.models, a.ref))
    results = run_suite(a.models, a.ref, opts, allow_pickle=a.allow_pickle)
    print(eval_table(results))
    write_results(results, a.output, a.json_out)
    return 0


def eval_table(results: dict) -> str:
    """One row per model: size, quality, tasks and speed where measured."""
    from frugal.report.table import fmt_bytes, table

    models = results["models"]
    tasks = sorted({t for m in models for t in (m.get("tasks") or {})})
    headers = ["model", "size", "bits/w", "ppl", "KL", "top-1"] + [f"{t} acc/norm" for t in tasks]
    speed = any(m.get("speed") for m in models)
    headers += ["prefill tok/s", "decode tok/s", "peak RSS"] if speed else []
    rows = []
    for m in models:
        row = [m["name"], fmt_bytes(m["size_bytes"]), "" if m.get("bits_per_weight") is None else f"{m['bits_per_weight']:.2f}",
               f"{m['perplexity']:.4f}", "" if m.get("kl") is None else f"{m['kl']:.5f}",
               "" if m.get("top1") is None else f"{100 * m['top1']:.2f}%"]
        for t in tasks:
            r = (m.get("tasks") or {}).get(t)
            row.append("" if r is None else f"{r['acc']:.3f}/{r['acc_norm']:.3f}")
        if speed:
            s = m.get("speed") or {}
            row += [f"{s['prefill_tok_s']['median']:.0f}" if s else "", f"{s['decode_tok_s']['median']:.1f}" if s else "",
                    fmt_bytes(s["peak_rss_bytes"]) if s else ""]
        rows.append(row)
    return table(headers, rows)
