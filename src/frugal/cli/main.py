"""The `frugal` command: compress, eval, info."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from frugal.errors import FrugalError

log = logging.getLogger("frugal")

EVAL_TOKENS = 8192  # short default budget; benchmarks pass the full budget


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text (default: shared wikitext-2-raw test split)")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="first N tokens of the text (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default %(default)s)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="frugal", description="Compress causal language models and prove what it cost.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="quantize a model's weights and save it (compressed-tensors)")
    c.add_argument("model", nargs="?", default=None, help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    c.add_argument("-o", "--output", help="output directory (default: out/<model>-<method>-w<bits>g<group>)")
    c.add_argument("--recipe", help="recipe file (.yaml/.json); the options below override it")
    c.add_argument("--method", choices=["gptq", "rtn", "hqq"], help="gptq (default), rtn, or hqq (calibration-free)")
    c.add_argument("--bits", type=int)
    c.add_argument("--group-size", type=int, help="32, 64, 128, or -1 for one scale per output channel")
    c.add_argument("--asym", action="store_true", default=None, help="asymmetric grid (with zero points)")
    c.add_argument("--scale-dtype", choices=["model", "float16", "bfloat16", "float32"],
                   help="dtype the scales are stored in (default: the model's)")
    c.add_argument("--rotate", choices=["hadamard", "random"], help="fuse an orthogonal rotation of the residual "
                   "stream (and per-head value/output) into the weights before quantizing (Llama/Mistral/Qwen/Phi-3)")
    c.add_argument("--awq", action="store_true", default=None, help="AWQ activation-aware scaling before RTN or GPTQ")
    c.add_argument("--awq-no-clip", action="store_true", default=None,
                   help="AWQ scales without its clip search (better before GPTQ; implies --awq)")
    c.add_argument("--refine", action="store_true", default=None, help="refine the codes and group scales of each block "
                   "on its output error against the float model (SignRound-style; after RTN, HQQ or GPTQ)")
    c.add_argument("--refine-iters", type=int, help="signed-gradient steps per block for --refine (default 50)")
    c.add_argument("--refine-norms", action="store_true", default=None,
                   help="also tune each block's norm weights and biases (stored in float; implies --refine)")
    c.add_argument("--mse-clip", action="store_true", default=None, help="MSE-optimal clipping search of each group's range")
    c.add_argument("--no-act-order", action="store_true", default=None, help="GPTQ in column order instead of activation order")
    c.add_argument("--damp", type=float, help="GPTQ dampening, fraction of mean(diag H)")
    c.add_argument("--samples", type=int, help="calibration samples")
    c.add_argument("--calib-len", type=int, help="calibration sample length in tokens")
    c.add_argument("--seed", type=int)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--calib", help="calibration text file (default: shared wikitext-2 valid.txt)")
    g.add_argument("--data-free", action="store_true", help="calibrate on text the model generates itself")
    c.add_argument("--format", choices=FORMAT_CHOICES, help="output format (default compressed-tensors; gguf with --gguf-type)")
    c.add_argument("--gguf-type", help="round onto a llama.cpp file type's GGML grids (Q4_0, Q4_K_M, ...); implies --format gguf")
    c.add_argument("--budget", help="mixed precision: best predicted accuracy within e.g. 3.5bpw (quantized layers, "
                   "scales included) or 200MB (whole checkpoint); runs (or reuses) `frugal analyze` first")
    c.add_argument("--max-kl", type=float, help="mixed precision: the smallest model whose predicted KL is <= this")
    c.add_argument("--candidates", default=None, help="integer formats the allocation may use "
                   "(default: the integer formats of `frugal analyze`)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (runs code from the file)")
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    c.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="one decoder block in memory at a time, resumable (default: when the model does not fit)")
    c.add_argument("--no-resume", action="store_true", help="start a streamed compression over instead of resuming")
    c.add_argument("--force", action="store_true", help="run even when the pre-flight estimate says it cannot fit")
    _add_eval_options(c)

    e = sub.add_parser("eval", help="evaluate models side by side on the same tokens (results.json, report.html)")
    e.add_argument("models", nargs="+", help="model directories or .gguf files ('default' = the default model)")
    e.add_argument("--ref", help="reference model for KL divergence, top-1 agreement and per-block error")
    e.add_argument("-o", "--output", help="directory for results.json and report.html")
    e.add_argument("--json", dest="json_out", help="also write results.json to this file")
    e.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated: piqa,hellaswag")
    e.add_argument("--task-limit", type=int, default=300, help="first N items of each task (default %(default)s; 0 = all)")
    e.add_argument("--speed", action="store_true", help="prefill/decode tokens/s, TTFT, peak RSS (one process per model)")
    e.add_argument("--generate", action="store_true", help="greedy generations for a few prompts, side by side")
    e.add_argument("--full", action="store_true", help="the whole evaluation text and every task item")
    e.add_argument("--allow-pickle", action="store_true")
    _add_eval_options(e)

    x = sub.add_parser("export", help="write a compressed (compressed-tensors) directory in another format")
    x.add_argument("compressed", help="directory written by `frugal compress`")
    x.add_argument("--format", required=True, choices=FORMAT_CHOICES)
    x.add_argument("-o", "--output", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    an = sub.add_parser("analyze", help="per-layer sensitivity to each candidate format (table, JSON, heat map)")
    an.add_argument("model", nargs="?", default=None)
    an.add_argument("--formats", default=DEFAULT_FORMATS, help="candidate formats (default %(default)s)")
    an.add_argument("--measure", default=DEFAULT_MEASURE,
                    help="formats whose KL is measured for every layer; the first fits each layer's amplification "
                         "(default %(default)s)")
    an.add_argument("--samples", type=int, default=4, help="calibration sequences (default %(default)s)")
    an.add_argument("--calib-len", type=int, default=128, help="tokens per sequence (default %(default)s)")
    an.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                    help="how candidates are rounded: to nearest, or by GPTQ as the compression will (default %(default)s)")
    an.add_argument("--hessian-samples", type=int, default=0,
                    help="with --method gptq: Hessians from N x 512 calibration tokens (default: the analysis tokens)")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--ops", action="store_true", help="instead of per-layer weight formats: round each operator "
                    "class (scores, softmax, norms, residual adds, ...) to low-precision floats and report the damage")
    an.add_argument("--ops-formats", help="float formats for --ops (default bfloat16,float16,fp8_e4m3,fp8_e5m2)")
    an.add_argument("--ops-classes", help="operator classes for --ops (default: all)")
    an.add_argument("--ops-per-block", action="store_true", help="with --ops: also per block, for the coarsest format")
    an.add_argument("-o", "--output", help="directory for analysis.json and heatmap.svg")
    an.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("info", help="architecture, parameters, layers that would be quantized, memory estimate")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--bits", type=int, default=4)
    i.add_argument("--group-size", type=int, default=128)
    i.add_argument("--samples", type=int, default=128)
    i.add_argument("--calib-len", type=int, default=512)
    i.add_argument("--allow-pickle", action="store_true")
    return ap


FORMAT_CHOICES = ["compressed-tensors", "gptq", "gguf", "onnx"]
DEFAULT_FORMATS = ("int2g32,int3g32,int3g64,int4g32,int4g64,int8g64,bf16,fp8_e4m3,fp8_e5m2,mxfp4,nvfp4,"
                   "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K")
DEFAULT_MEASURE = "int3g64,int4g64"


def analysis_formats(recipe) -> list[str]:
    """Candidates analysed for --budget/--max-kl: all default formats for RTN (one cached analysis serves
    every target); with GPTQ, which costs a GPTQ run per layer and format, only the formats the plan
    can pick (integer grids, or GGML types for a GGUF target) plus the measured ones."""
    from frugal.analysis.analyze import parse_candidate

    names = DEFAULT_FORMATS.split(",")
    if recipe.method != "gptq":
        return names
    keep = (lambda c: bool(c.ggml)) if recipe.gguf_type else (lambda c: c.scheme is not None)
    return [n for n in names if keep(parse_candidate(n)) or n in DEFAULT_MEASURE.split(",")]


def _output_format(a: argparse.Namespace, recipe) -> str:
    if recipe.gguf_type and a.format not in (None, "gguf"):
        raise FrugalError(f"--format {a.format}: --gguf-type rounds onto GGML grids, which only --format gguf holds")
    return a.format or ("gguf" if recipe.gguf_type else "compressed-tensors")


def _recipe_from_args(a: argparse.Namespace):
    from frugal.config import Recipe

    d = Recipe.load(a.recipe).to_dict() if a.recipe else Recipe().to_dict()
    sets = {("method",): a.method, ("weights", "bits"): a.bits, ("weights", "group_size"): a.group_size,
            ("weights", "symmetric"): False if a.asym else None, ("weights", "scale_dtype"): a.scale_dtype, ("clip", "enabled"): a.mse_clip,
            ("gptq", "act_order"): False if a.no_act_order else None, ("gptq", "dampening"): a.damp,
            ("calibration", "num_samples"): a.samples, ("calibration", "seq_len"): a.calib_len, ("seed",): a.seed,
            ("gguf_type",): a.gguf_type, ("rotation", "kind"): a.rotate,
            ("awq", "enabled"): True if a.awq_no_clip else a.awq, ("awq", "clip"): False if a.awq_no_clip else None,
            ("refine", "enabled"): True if a.refine_norms else a.refine, ("refine", "iters"): a.refine_iters,
            ("refine", "norms"): a.refine_norms}
    for keys, value in sets.items():
        if value is not None:
            target = d
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
    return Recipe.from_dict(d)


def _protocol(a: argparse.Namespace):
    from frugal.evaluation.metrics import Protocol
    from frugal.load.model import shared_dir

    text = a.text or str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw")
    return Protocol(text=text, seq_len=a.seq_len, max_tokens=a.eval_tokens)


def cmd_compress(a: argparse.Namespace) -> int:
    from frugal.atomic import check_output_dir
    from frugal.load.model import load_model
    from frugal.evaluation.sizes import model_bytes, saved_bytes

    recipe = _recipe_from_args(a)
    w = recipe.weights
    fmt = _output_format(a, recipe)
    source_name = Path(a.model).stem if a.model else "SmolLM2-135M-Instruct"
    scheme = recipe.gguf_type or f"w{w.bits}g{w.group_size}"
    out = Path(a.output or f"out/{source_name}-{recipe.method}-{scheme}" + ("" if fmt == "compressed-tensors" else f"-{fmt}"))
    check_output_dir(out, a.overwrite)
    if _preflight(a, recipe, fmt, out) != "memory":
        return _compress_streaming(a, recipe, out)
    protocol = None if a.no_eval else _protocol(a)
    if protocol:  # fail on a bad evaluation text before any work
        from frugal.calibrate import read_text

        read_text(protocol.text)
    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    size_before = model_bytes(loaded.model)
    import frugal

    t0 = time.perf_counter()
    calibration = "data-free" if a.data_free else a.calib
    mixed = None
    if a.max_kl is not None:
        result, mixed = _compress_within_kl(a, recipe, loaded, calibration, fmt)
    else:
        if a.budget:
            recipe, mixed = _mixed_planner(a, recipe, loaded)[0](None)
        result = frugal.compress(loaded.model, recipe, calibration, tokenizer=loaded.tokenizer, inplace=True,
                                 formats=(fmt,))
    result.report.source = str(loaded.source)
    result.report.mixed = mixed
    compress_s = time.perf_counter() - t0
    result.save(out, overwrite=a.overwrite, fmt=fmt)
    from frugal.report.table import fmt_bytes

    rows = [("weights", fmt_bytes(size_before), fmt_bytes(saved_bytes(out)), fmt)]
    if protocol:
        from frugal.evaluation.metrics import evaluate

        original = load_model(a.model, allow_pickle=a.allow_pickle).model
        t1 = time.perf_counter()
        ref, comp = evaluate({"compressed": result.model}, loaded.tokenizer, protocol, ref=original)
        rows += [("perplexity", f"{ref.ppl:.3f}", f"{comp.ppl:.3f}", f"{100 * (comp.ppl / ref.ppl - 1):+.2f}%"),
                 ("KL divergence (nats/token)", "0", f"{comp.kl:.5f}", ""),
                 ("top-1 agreement", "100%", f"{100 * comp.top1:.2f}%", ""),
                 ("evaluated tokens", str(ref.tokens), str(comp.tokens), f"{time.perf_counter() - t1:.0f} s")]
    rows.append(("compression wall time", "", f"{compress_s:.1f} s", ""))
    from frugal.report.table import table

    what = recipe.gguf_type or f"W{w.bits} g{w.group_size}{'' if w.symmetric else ' asym'}"
    print(f"\n{recipe.method.upper()} {what}: {loaded.source.name} -> {out}")
    print(table(["", "original", "compressed", "change"], rows))
    return 0


def _preflight(a: argparse.Namespace, recipe, fmt: str, out: Path) -> str:
    """Estimate memory and disk before any work; "memory", "stream" or "stream-offload" (one block in
    memory at a time). Jobs streaming cannot do (other formats, mixed precision, data-free, GGUF grids)
    stay in memory, and are refused when memory cannot hold them (unless --force)."""
    from frugal.load.model import resolve
    from frugal.compression.preflight import decide
    from frugal.compression.stream import model_directory

    source = resolve(a.model)
    if a.allow_pickle or (source.is_file() and source.suffix != ".gguf"):
        return "memory"  # the loader refuses or reads what streaming cannot
    directory, _ = model_directory(source)
    needs_memory = [why for why, bad in (("--format " + fmt, fmt != "compressed-tensors"), ("--budget", a.budget),
                                         ("--max-kl", a.max_kl is not None), ("--data-free", a.data_free),
                                         ("--gguf-type", recipe.gguf_type),
                                         ("rotation", recipe.rotation.kind != "none"),
                                         ("--refine", recipe.refine.enabled)) if bad]
    if a.stream and needs_memory:
        raise FrugalError(f"--stream: {needs_memory[0]} needs the whole model in memory")
    mode, _ = decide(directory, recipe, out, stream=False if needs_memory else a.stream, force=a.force)
    return mode


def _compress_streaming(a: argparse.Namespace, recipe, out: Path) -> int:
    """`frugal compress` one decoder block at a time (resumable); no before/after evaluation, which would
    need the whole model twice: run `frugal eval OUT --ref MODEL` on a machine that holds it."""
    from frugal.report.table import fmt_bytes, table
    from frugal.evaluation.sizes import saved_bytes
    from frugal.compression.stream import compress_streaming, model_directory

    t0 = time.perf_counter()
    directory, source = model_directory(a.model)
    compress_streaming(a.model, recipe, out, a.calib, overwrite=a.overwrite, resume=not a.no_resume)
    from frugal.compression.preflight import checkpoint_tensors

    before = sum(t.offsets[1] - t.offsets[0] for t in checkpoint_tensors(directory).values())
    print(f"\n{recipe.method.upper()} (streamed, one block in memory): {source.name} -> {out}")
    print(table(["", "original", "compressed", "change"],
                [("weights", fmt_bytes(before), fmt_bytes(saved_bytes(out)), "compressed-tensors"),
                 ("compression wall time", "", f"{time.perf_counter() - t0:.1f} s", "")]))
    log.info("streamed compression: no evaluation (run `frugal eval %s --ref MODEL`)", out)
    return 0


def _mixed_planner(a: argparse.Namespace, recipe, loaded):
    """Analyse (or reuse the cached analysis) and return (planner, samples): planner(max_kl) gives the
    recipe with per-layer overrides for --budget (max_kl None) or for a KL target, plus the plan summary."""
    from frugal.analysis.analyze import cached_analyze
    from frugal.load.blocks import quantizable_linears
    from frugal.calibrate import default_text, from_text
    from frugal.analysis.mixed import apply, plan
    from frugal.evaluation.sizes import model_bytes

    samples = from_text(loaded.tokenizer, default_text(), 4, 128, recipe.seed)
    hessian_samples = None
    if recipe.method == "gptq" and not a.data_free:  # GPTQ-aware damage, Hessians from the compression's calibration
        c = recipe.calibration
        hessian_samples = from_text(loaded.tokenizer, a.calib or default_text(), c.num_samples, c.seq_len, recipe.seed)
    analysis, _ = cached_analyze(loaded.model, loaded.source, samples, analysis_formats(recipe),
                                 DEFAULT_MEASURE.split(","), recipe.ignore, method=recipe.method,
                                 hessian_samples=hessian_samples, gptq=recipe.gptq)
    linears = quantizable_linears(loaded.model, recipe.ignore)
    float_bytes = model_bytes(loaded.model) - sum(l.weight.numel() * l.weight.element_size() for l in linears.values())
    cands = a.candidates.split(",") if a.candidates else None

    def planner(max_kl):
        p = plan(analysis, None if max_kl is not None else a.budget, max_kl, cands, float_bytes=float_bytes,
                 ggml=bool(recipe.gguf_type))
        log.info("mixed precision: %.3f bits/weight, predicted KL %.4g, %s", p.bpw, p.predicted_kl,
                 p.to_dict()["count"])
        return apply(recipe, p), p.to_dict()
    return planner, samples


MAX_KL_ROUNDS = 3


def _compress_within_kl(a: argparse.Namespace, recipe, loaded, calibration, fmt: str):
    """--max-kl: plan on the predicted KL, compress, measure the KL on the analysis tokens, and tighten the
    prediction's target until the measured KL is within the limit (at most MAX_KL_ROUNDS compressions)."""
    import frugal

    from frugal.analysis.mixed import measured_kl

    planner, samples = _mixed_planner(a, recipe, loaded)
    target, kl = a.max_kl, None
    for rnd in range(1, MAX_KL_ROUNDS + 1):
        try:
            r, mixed = planner(target)
        except FrugalError as e:
            if kl is None:
                raise FrugalError(f"--max-kl {a.max_kl}: {e}") from None
            raise FrugalError(f"--max-kl {a.max_kl}: measured KL {kl:.4g}, and no allocation of the candidates "
                              "predicts less; raise the limit or add formats with more bits (--candidates)") from None
        result = frugal.compress(loaded.model, r, calibration, tokenizer=loaded.tokenizer, formats=(fmt,))
        kl = measured_kl(loaded.model, result.model, samples)
        log.info("--max-kl round %d: target %.4g, measured KL %.4g", rnd, target, kl)
        if kl <= a.max_kl:
            return result, {**mixed, "max_kl": a.max_kl, "measured_kl": kl, "rounds": rnd}
        target *= a.max_kl / kl
    raise FrugalError(f"--max-kl {a.max_kl}: measured KL was still {kl:.4g} after {MAX_KL_ROUNDS} rounds; "
                      "raise the limit or add formats with more bits (--candidates)")


def cmd_eval(a: argparse.Namespace) -> int:
    from frugal.atomic import atomic_dir, check_output_dir
    from frugal.calibrate import read_text
    from frugal.evaluation.suite import SuiteOptions, run_suite

    if a.full:
        a.eval_tokens, a.task_limit = 10**9, 0
    protocol = _protocol(a)
    read_text(protocol.text)
    tasks = {t: (a.task_limit or None) for t in a.tasks.split(",") if t}
    unknown = [t for t in tasks if t not in ("piqa", "hellaswag")]
    if unknown:
        raise FrugalError(f"--tasks {unknown[0]}: known tasks are piqa, hellaswag")
    if a.output:
        check_output_dir(a.output, overwrite=True)
    opts = SuiteOptions(protocol=protocol, tasks=tasks, speed=a.speed, generate=a.generate)
    results = run_suite(a.models, a.ref, opts, allow_pickle=a.allow_pickle)
    print(eval_table(results))
    payload = json.dumps(results, indent=2) + "\n"
    if a.json_out:
        from frugal.atomic import write_text_atomic

        write_text_atomic(a.json_out, payload)
    if a.output:
        from frugal.report.html import render_html

        with atomic_dir(a.output, overwrite=True) as tmp:
            (tmp / "results.json").write_text(payload)
            (tmp / "report.html").write_text(render_html(results))
        log.info("wrote %s/results.json and report.html", a.output)
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


def cmd_export(a: argparse.Namespace) -> int:
    from frugal.exporters.reload import load_compressed
    from frugal.atomic import check_output_dir
    from frugal.report.table import fmt_bytes, table
    from frugal.evaluation.sizes import saved_bytes

    check_output_dir(Path(a.output), a.overwrite)
    compressed = load_compressed(a.compressed)
    out = compressed.save(a.output, overwrite=a.overwrite, fmt=a.format)  # checks the format first
    rows = [("source", str(a.compressed), fmt_bytes(saved_bytes(Path(a.compressed))))]
    rows.append((a.format, str(out), fmt_bytes(saved_bytes(out))))
    print(table(["", "directory", "weights"], rows))
    if a.format == "gguf":
        import json

        recs = json.loads((out / "frugal.json").read_text())["gguf"]["tensors"].values()
        inexact = [r for r in recs if not r["exact"]]
        worst = max((r["rel_error"] for r in inexact), default=0.0)
        print(f"GGUF: {len(recs) - len(inexact)} of {len(recs)} tensors exact; largest relative change {worst:.2e}"
              " (per tensor in frugal.json)")
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from frugal.analysis.analyze import cached_analyze
    from frugal.calibrate import default_text, from_text
    from frugal.load.model import load_model
    from frugal.report.table import table
    from frugal.analysis.report import format_table, top_layers, write

    out = Path(a.output) if a.output else None
    if out:
        from frugal.atomic import check_output_dir

        check_output_dir(out, a.overwrite)
    loaded = load_model(a.model)
    samples = from_text(loaded.tokenizer, default_text(), a.samples, a.calib_len, a.seed)
    if a.ops:
        return _analyze_ops(a, loaded, samples, out)
    hessian_samples = None
    if a.method == "gptq" and a.hessian_samples:
        hessian_samples = from_text(loaded.tokenizer, default_text(), a.hessian_samples, 512, a.seed)
    analysis, cached = cached_analyze(loaded.model, loaded.source, samples, a.formats.split(","), a.measure.split(","),
                                      method=a.method, hessian_samples=hessian_samples)
    print(table(*format_table(analysis)))
    print()
    print(table(*top_layers(analysis, analysis.measured[0])))
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
            (tmp / "op_sensitivity.json").write_text(json.dumps(res.to_dict(), indent=1, sort_keys=True) + "\n")
            (tmp / "op_sensitivity.md").write_text(res.table() + "\n" + (
                "\n" + res.per_block_table() + "\n" if a.ops_per_block else ""))
        print(f"wrote {out}/op_sensitivity.json and {out}/op_sensitivity.md")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from frugal.load.blocks import find_blocks, quantizable_linears
    from frugal.config import WeightScheme
    from frugal.load.model import load_model
    from frugal.report.table import fmt_bytes, table
    from frugal.evaluation.sizes import compression_estimate, model_bytes

    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    m = loaded.model
    scheme = WeightScheme(a.bits, a.group_size)
    scheme.validate("info")
    blocks_name, blocks = find_blocks(m)
    layers = quantizable_linears(m, ("lm_head",))
    n_params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    est = compression_estimate(m, layers, scheme, a.samples, a.calib_len)
    misfit = [n for n, l in layers.items() if a.group_size != -1 and l.in_features % a.group_size]
    kinds: dict[str, list] = {}  # layer kind -> [count, first layer of that kind]
    for n, lin in layers.items():
        key = n[len(blocks_name) + 1:].split(".", 1)[1] if n.startswith(blocks_name + ".") else n
        kinds.setdefault(key, [0, lin])[0] += 1
    print(f"{loaded.source}: {m.config.model_type} ({type(m).__name__}), {n_params / 1e6:.1f} M parameters, "
          f"{len(blocks)} blocks at '{blocks_name}'")
    print(table(["layer (per block)", "count", "in", "out"],
                [(k, c, lin.in_features, lin.out_features) for k, (c, lin) in kinds.items()]))
    rows = [("float weights", fmt_bytes(model_bytes(m))),
            (f"quantized W{a.bits} g{a.group_size} (estimate)", fmt_bytes(est["output_bytes"]))]
    if not a.allow_pickle:
        from frugal.config import Recipe
        from frugal.compression.preflight import available_ram_bytes, estimate, free_disk_bytes

        pre = estimate(loaded.path, Recipe(weights=scheme), a.samples, a.calib_len)
        rows += [(label, fmt_bytes(n)) for label, n in pre.rows()]
        rows += [("this machine: available RAM", fmt_bytes(available_ram_bytes())),
                 ("this machine: free disk (here)", fmt_bytes(free_disk_bytes(Path.cwd())))]
    print(table(["memory", "bytes"], rows))
    if misfit:
        print(f"group size {a.group_size} does not divide the input width of {len(misfit)} layers (e.g. {misfit[0]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    level = logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # our own bars say what is happening
        return {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "export": cmd_export,
                "analyze": cmd_analyze}[a.cmd](a)
    except FrugalError as e:
        print(f"frugal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frugal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a write that failed outside atomic_dir (cache, checkpoint): one line, not a traceback
        from frugal.atomic import os_error_code

        code = os_error_code(e)
        if code is None:
            raise
        print(f"frugal: error: {getattr(e, 'filename', None) or 'write'}: {os.strerror(code)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
