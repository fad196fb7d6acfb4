"""`frugal compress`: quantize a model's weights and save it."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from frugal.errors import FrugalError

log = logging.getLogger("frugal")

def default_format() -> str:
    """The format `frugal compress` writes without --format (the first of frugal.exporters.FORMATS)."""
    from frugal import exporters

    return exporters.default_format()


def _output_format(a: argparse.Namespace, recipe) -> str:
    """--format, else GGUF for --gguf-type, else the first format --engine reads, else the default; refused
    here, before any work, when --engine cannot run the output."""
    from frugal.exporters import check_engine, format_for_engine, ggml_format

    if recipe.gguf_type and a.format not in (None, ggml_format()):
        raise FrugalError(f"--format {a.format}: --gguf-type rounds onto GGML grids, which only --format "
                          f"{ggml_format()} holds")
    engine = getattr(a, "engine", None)
    fmt = a.format or (ggml_format() if recipe.gguf_type else format_for_engine(engine, recipe) if engine
                       else default_format())
    if engine:
        check_engine(fmt, recipe, engine)
    return fmt


def _named_format(a: argparse.Namespace) -> str | None:
    """The format the options name: --format, or the first one --engine reads (None: neither given)."""
    from frugal.config import Recipe
    from frugal.exporters import format_for_engine

    engine = getattr(a, "engine", None)
    return a.format or (format_for_engine(engine, Recipe()) if engine else None)


def _preset(a: argparse.Namespace) -> dict:
    """The recommended recipe (frugal.config.RECOMMENDED) less what the options given replace: its AWQ
    when the named method calibrates nothing itself (RTN, HQQ stay calibration-free) or the target is a
    GGML grid (--gguf-type), its asymmetric grid when the output is GGUF (Q4_0 holds the symmetric one
    exactly); with --engine, the scale storage that engine computes in. Options named explicitly (--awq,
    --asym) still win."""
    from frugal.compression import methods
    from frugal.config import recommended
    from frugal.exporters import ggml_format, recommended_for

    d = recommended_for(a.engine) if getattr(a, "engine", None) else recommended()
    if a.gguf_type or (a.method and not methods.get(a.method).needs_hessian):
        d["awq"]["enabled"] = False
    if a.gguf_type or _named_format(a) == ggml_format():
        d["weights"]["symmetric"] = True
    return d


def recipe_from_args(a: argparse.Namespace):
    from frugal.config import Recipe

    d = Recipe.load(a.recipe).to_dict() if a.recipe else _preset(a)
    symmetric = True if a.sym else False if a.asym else None
    awq = False if a.no_awq else True if a.awq_no_clip else a.awq
    sets = {("method",): a.method, ("weights", "bits"): a.bits, ("weights", "group_size"): a.group_size,
            ("strict_groups",): getattr(a, "strict_groups", None),
            ("weights", "symmetric"): symmetric, ("weights", "scale_dtype"): a.scale_dtype, ("clip", "enabled"): a.mse_clip,
            ("gptq", "act_order"): False if a.no_act_order else None, ("gptq", "dampening"): a.damp,
            ("calibration", "num_samples"): a.samples, ("calibration", "seq_len"): a.calib_len, ("seed",): a.seed,
            ("gguf_type",): a.gguf_type, ("rotation", "kind"): a.rotate,
            ("awq", "enabled"): awq, ("awq", "clip"): False if a.awq_no_clip else True if a.awq else None, ("storage", "dtype"): a.dtype,
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
    from frugal.api import eval_protocol

    return eval_protocol(a.text, a.seq_len, a.eval_tokens)


def cmd_compress(a: argparse.Namespace) -> int:
    from frugal.atomic import check_output_dir
    from frugal.load.model import load_model
    from frugal.evaluation.sizes import model_bytes, saved_bytes

    recipe = recipe_from_args(a)
    w = recipe.weights
    fmt = _output_format(a, recipe)
    source_name = Path(a.model).stem if a.model else "SmolLM2-135M-Instruct"
    scheme = recipe.gguf_type or f"w{w.bits}g{w.group_size}"
    out = Path(a.output or f"out/{source_name}-{recipe.method}-{scheme}" + ("" if fmt == default_format() else f"-{fmt}"))
    from frugal.load.model import resolve

    check_output_dir(out, a.overwrite, sources=(resolve(a.model),))
    protocol = None if a.no_eval else _protocol(a)  # bad evaluation options fail before any work
    if protocol:
        from frugal.calibrate import read_text

        read_text(protocol.text)
    if _preflight(a, recipe, fmt, out) != "memory":
        return _compress_streaming(a, recipe, out)
    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    if protocol:
        from frugal.compression.plan import check_sequence_length

        check_sequence_length(loaded.model, protocol.seq_len, "--seq-len")
    size_before = model_bytes(loaded.model)
    import frugal
    from frugal.analysis import budget

    t0 = time.perf_counter()
    calibration = "data-free" if a.data_free else a.calib
    mixed = None
    plan_args = dict(tokenizer=loaded.tokenizer, source=loaded.source, calibration=calibration, candidates=a.candidates)
    if a.max_kl is not None:
        def one_round(r):
            return frugal.compress(loaded.model, r, calibration, tokenizer=loaded.tokenizer, formats=(fmt,),
                                   engine=a.engine)

        result, mixed = budget.compress_within_kl(loaded.model, recipe, a.max_kl, one_round, **plan_args)
    else:
        if a.budget:
            recipe, mixed = budget.plan_budget(loaded.model, recipe, budget=a.budget, **plan_args)
        result = frugal.compress(loaded.model, recipe, calibration, tokenizer=loaded.tokenizer, inplace=True,
                                 formats=(fmt,), engine=a.engine)
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
    print(f"\n{recipe.describe()}, {what}: {loaded.source.name} -> {out}")
    print(table(["", "original", "compressed", "change"], rows))
    _print_engines(fmt, recipe, out)
    return 0


def _print_engines(fmt: str, recipe, out: Path) -> None:
    """Where the output runs and how (the format's `engines`)."""
    from frugal.exporters import engines

    rows = engines(fmt, recipe, str(out))
    if rows:
        width = max(len(e.name) for e in rows)
        print(f"\nRuns in ({fmt}):")
        for e in rows:
            print(f"  {e.name:<{width}}  {f'not this file: {e.refusal}' if e.refusal else e.command}")


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
    directory, _ = model_directory(source, warn=False)
    needs_memory = [why for why, bad in (("--format " + fmt, fmt != default_format()), ("--budget", a.budget),
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
    from frugal.compression.stream import model_directory

    import frugal

    t0 = time.perf_counter()
    directory, source = model_directory(a.model)
    frugal.compress(a.model, recipe, a.calib, stream=True, out=out, overwrite=a.overwrite, resume=not a.no_resume,
                    engine=a.engine)
    from frugal.compression.preflight import checkpoint_tensors

    before = sum(t.offsets[1] - t.offsets[0] for t in checkpoint_tensors(directory).values())
    print(f"\n{recipe.describe()} (streamed, one block in memory): {source.name} -> {out}")
    print(table(["", "original", "compressed", "change"],
                [("weights", fmt_bytes(before), fmt_bytes(saved_bytes(out)), default_format()),
                 ("compression wall time", "", f"{time.perf_counter() - t0:.1f} s", "")]))
    _print_engines(default_format(), recipe, out)
    log.info("streamed compression: no evaluation (run `frugal eval %s --ref MODEL`)", out)
    return 0
