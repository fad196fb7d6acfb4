"""The Python API: everything the `frugal` command does, with the same errors.

    frugal.compress(model, recipe, calibration, budget=..., max_kl=..., stream=..., out=...)
    frugal.analyze(model, ...)        frugal.export(directory, fmt, out)        frugal.evaluate(...)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from frugal.analysis.budget import DEFAULT_FORMATS, DEFAULT_MEASURE, split_names
from frugal.compression.result import Compressed, CompressionReport
from frugal.config import Recipe, as_recipe
from frugal.errors import FrugalError

log = logging.getLogger(__name__)

DEFAULT_FORMAT = "compressed-tensors"  # what `Compressed.save` and streaming write
EVAL_TOKENS = 8192  # short default budget; benchmarks pass the full budget


def _compress(model, tokenizer, source: str, recipe: Recipe, calibration: Any, formats: tuple[str, ...]) -> Compressed:
    """Compress `model` in place (the engine behind `compress`)."""
    from frugal import calibrate
    from frugal.compression import timing, transforms
    from frugal.compression.engine import compress_model
    from frugal.compression.plan import check_plan, fit_groups
    from frugal.compression.transforms import Place

    from frugal.load.linears import as_linears

    if as_linears(model):
        log.info("MoE: every expert is quantized as its own matrix")
    recipe = fit_groups(model, recipe)
    check_plan(model, recipe, formats, calibration)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    with timing.collect() as stages:
        for name, step in transforms.named_steps_at(recipe, Place.MODEL):  # function-preserving: calibration sees the result
            with timing.stage(name):
                step(model, recipe)
        with timing.stage("calibration data"):
            samples, calib_info = calibrate.for_recipe(calibration, tokenizer, model, recipe)
        quantized, layers = compress_model(model, recipe, samples)
    if not quantized:
        raise FrugalError("no linear layer was quantized (check recipe.ignore)")
    report = CompressionReport(recipe, source, calib_info, layers, seconds=time.perf_counter() - t0, stages=stages)
    log.info("compression stages: %s", timing.describe(stages))
    return Compressed(model=model, tokenizer=tokenizer, quantized=quantized, report=report)


def _engine_recipe(engine: str) -> Recipe:
    """The recommended recipe with the scale storage `engine` computes in (bfloat16 for vLLM)."""
    from frugal.exporters import recommended_for

    return Recipe.from_dict(recommended_for(engine))


def _engine_formats(recipe: Recipe, formats: tuple[str, ...], engine: str) -> tuple[str, ...]:
    """`formats`, led by the first format `engine` reads when none is given; FrugalError when `engine`
    cannot run `recipe` in formats[0]."""
    from frugal.exporters import check_engine, format_for_engine

    formats = formats or (format_for_engine(engine, recipe),)
    check_engine(formats[0], recipe, engine)
    return formats


def _streamed(model_or_path, recipe: Recipe, calibration, formats, budget, max_kl, out, overwrite, resume) -> Path:
    from frugal.compression.stream import compress_streaming

    other = next((f for f in formats if f != DEFAULT_FORMAT), None)
    needs_memory = [why for why, bad in ((f"--format {other}", other), ("--budget", budget),
                                         ("--max-kl", max_kl is not None)) if bad]
    if needs_memory:
        raise FrugalError(f"--stream: {needs_memory[0]} needs the whole model in memory")
    if isinstance(model_or_path, torch.nn.Module):
        raise FrugalError("--stream: give a model directory or .gguf file, not a loaded model")
    if out is None:
        raise FrugalError("--stream: give the output directory (out=...)")
    return compress_streaming(model_or_path, recipe, out, calibration, overwrite=overwrite, resume=resume)


def compress(model_or_path: Any = None, recipe: Recipe | dict | str | Path | None = None, calibration: Any = None,
             *, tokenizer: Any = None, allow_pickle: bool = False, inplace: bool = False,
             formats: tuple[str, ...] = (), budget: str | None = None, max_kl: float | None = None,
             candidates: str | list[str] | None = None, stream: bool | None = None, out: str | Path | None = None,
             overwrite: bool = False, resume: bool = True, engine: str | None = None) -> Compressed | Path:
    """Compress a model (a transformers model, a directory, a GGUF file, or None for the default).

    `calibration`: a text file (default: shared wikitext-2 valid.txt), a (N, L) tensor of token ids,
    or "data-free" to calibrate on sequences the model generates itself. `formats`: export formats
    the result must be writable to; checked before any work.

    Mixed precision (as `frugal compress --budget/--max-kl`): `budget` ("3.5bpw", "200MB") gives the least
    predicted KL within that size; `max_kl` the smallest model whose KL, measured on the analysis tokens,
    is <= max_kl. `candidates`: the formats the allocation may use (list or comma-separated). The plan is
    in `result.report.mixed` (frugal.json "mixed_precision"). The analysis is cached when the model is
    given as a path.

    `engine` (as `frugal compress --engine`: "vllm", "vllm-cpu", "llama.cpp", "openvino", ...): the engine the
    result must run in; picks formats[0] when `formats` is empty and refuses, before any work, a recipe
    that engine cannot run (frugal.exporters.check_engine).

    `out`: also save the result there (in formats[0], default compressed-tensors; `overwrite` an existing
    directory). `stream=True` compresses one decoder block in memory at a time (resumable, `resume`) into
    `out`, which it needs, and returns that path instead of a `Compressed` (a directory or .gguf model;
    compressed-tensors only, no mixed precision). `stream` None or False: in memory.
    """
    recipe = _engine_recipe(engine) if recipe is None and engine else as_recipe(recipe)
    if engine:
        formats = _engine_formats(recipe, tuple(formats), engine)
    if stream:
        return _streamed(model_or_path, recipe, calibration, tuple(formats), budget, max_kl, out, overwrite, resume)
    if budget is not None and max_kl is not None:
        raise FrugalError("mixed precision: give exactly one of --budget and --max-kl")
    if out is not None:
        from frugal.atomic import check_output_dir

        check_output_dir(out, overwrite, sources=(model_or_path,))
    cache_source = None
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path if inplace or max_kl is not None else copy.deepcopy(model_or_path)
        source = type(model).__name__
    else:
        model, tokenizer, cache_source = _load(model_or_path, tokenizer, allow_pickle)
        source = str(cache_source)
    formats = tuple(formats)
    mixed = None
    if max_kl is not None:
        from frugal.analysis.budget import compress_within_kl

        def one_round(r: Recipe) -> Compressed:
            return compress(model, r, calibration, tokenizer=tokenizer, formats=formats)

        result, mixed = compress_within_kl(model, recipe, max_kl, one_round, tokenizer=tokenizer,
                                           source=cache_source, calibration=calibration, candidates=candidates)
        result.report.source = source
    else:
        if budget is not None:
            from frugal.analysis.budget import plan_budget

            recipe, mixed = plan_budget(model, recipe, budget=budget, tokenizer=tokenizer, source=cache_source,
                                        calibration=calibration, candidates=candidates)
            if engine:  # the plan may have picked formats the engine cannot run
                _engine_formats(recipe, formats, engine)
        result = _compress(model, tokenizer, source, recipe, calibration, formats)
    result.report.mixed = mixed
    if out is not None:
        result.save(out, overwrite=overwrite, fmt=formats[0] if formats else DEFAULT_FORMAT)
    return result


def _load(model: Any, tokenizer: Any, allow_pickle: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, source path or None) of a transformers model or a model spec."""
    if isinstance(model, torch.nn.Module):
        return model, tokenizer, None
    from frugal.load.model import load_model

    loaded = load_model(model, allow_pickle=allow_pickle)
    return loaded.model, tokenizer or loaded.tokenizer, loaded.source


def _split(names: str | list[str] | tuple[str, ...]) -> list[str]:
    return split_names(names) or []


def write_ops(res: Any, directory: Path, per_block: bool) -> None:
    """op_sensitivity.json and op_sensitivity.md of an operator analysis into `directory`."""
    (directory / "op_sensitivity.json").write_text(json.dumps(res.to_dict(), indent=1, sort_keys=True) + "\n")
    (directory / "op_sensitivity.md").write_text(res.table() + "\n" + (
        "\n" + res.per_block_table() + "\n" if per_block else ""))


def analyze(model: Any = None, *, tokenizer: Any = None, samples: int = 4, calib_len: int = 128,
            formats: str | list[str] = DEFAULT_FORMATS, measure: str | list[str] = DEFAULT_MEASURE,
            method: str = "rtn", hessian_samples: int = 0, seed: int = 0, ignore: tuple[str, ...] = ("lm_head",),
            output: str | Path | None = None, overwrite: bool = False, allow_pickle: bool = False,
            ops: bool = False, ops_formats: str | list[str] | None = None, ops_classes: str | list[str] | None = None,
            ops_per_block: bool = False) -> Any:
    """Per-layer sensitivity to each candidate format (`frugal analyze`): an `Analysis`, cached when the
    model is given as a path; `output` also gets analysis.json and heatmap.svg. `method`: how candidates
    are rounded, with Hessians (from `hessian_samples` x 512 calibration tokens, default the analysis
    tokens) when the method needs them, else to nearest. `ops=True`: the operator-class analysis
    (`frugal analyze --ops`) instead, its result written as op_sensitivity.json/.md."""
    from frugal.atomic import atomic_dir, check_output_dir
    from frugal.calibrate import default_text, from_text

    out = check_output_dir(output, overwrite, sources=(model,)) if output is not None else None
    model, tokenizer, source = _load(model, tokenizer, allow_pickle)
    if tokenizer is None:
        raise FrugalError("analyze: no tokenizer, so the analysis text cannot be read")
    ids = from_text(tokenizer, default_text(), samples, calib_len, seed)
    if ops:
        from frugal.analysis.ops import DEFAULT_FORMATS as OP_FORMATS, op_sensitivity

        res = op_sensitivity(model, ids, _split(ops_formats) if ops_formats else OP_FORMATS,
                             _split(ops_classes) if ops_classes else None, per_block=ops_per_block)
        if out:
            with atomic_dir(out, overwrite) as tmp:
                write_ops(res, tmp, ops_per_block)
        return res
    analysis, _ = sensitivity(model, source, tokenizer, ids, formats, measure, method, hessian_samples, seed, ignore)
    if out:
        from frugal.analysis.report import write

        with atomic_dir(out, overwrite) as tmp:
            write(analysis, tmp)
    return analysis


def sensitivity(model, source, tokenizer, ids, formats, measure, method: str = "rtn", hessian_samples: int = 0,
                seed: int = 0, ignore: tuple[str, ...] = ("lm_head",)) -> tuple[Any, bool]:
    """(Analysis, whether it came from the cache) of `model` on token ids `ids` (cached when `source`)."""
    from frugal.analysis.analyze import analyze as run, cached_analyze
    from frugal.analysis.budget import analysis_method
    from frugal.calibrate import default_text, from_text
    from frugal.compression import methods
    from frugal.load.linears import as_linears

    as_linears(model)  # MoE experts and Conv1D: each layer's sensitivity, as compression will round it
    h_ids = None
    if methods.get(method, "--method").needs_hessian and hessian_samples:
        h_ids = from_text(tokenizer, default_text(), hessian_samples, 512, seed)
    args = (ids, _split(formats), _split(measure))
    kw = dict(method=analysis_method(method), hessian_samples=h_ids)
    if source is None:
        return run(model, *args, tuple(ignore), **kw), False
    return cached_analyze(model, source, *args, tuple(ignore), **kw)


def export(compressed_dir: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write a `frugal compress` (compressed-tensors) directory in format `fmt` into `out` (`frugal export`)."""
    from frugal.atomic import check_output_dir
    from frugal.exporters.reload import load_compressed

    check_output_dir(Path(out), overwrite, sources=(compressed_dir,))
    compressed = load_compressed(compressed_dir)
    return compressed.save(out, overwrite=overwrite, fmt=fmt)  # checks the format first


def eval_protocol(text: str | Path | None = None, seq_len: int = 512, eval_tokens: int = EVAL_TOKENS):
    """The evaluation protocol (default text: the shared wikitext-2-raw test split)."""
    from frugal.evaluation.metrics import Protocol
    from frugal.load.model import shared_dir

    if seq_len < 2:
        raise FrugalError(f"--seq-len {seq_len}: evaluation windows need at least 2 tokens")
    if eval_tokens < seq_len:
        raise FrugalError(f"--eval-tokens {eval_tokens}: fewer than one evaluation window of --seq-len {seq_len} tokens")

    text = str(text) if text else str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw")
    return Protocol(text=text, seq_len=seq_len, max_tokens=eval_tokens)


def suite_options(protocol, tasks: str | list[str] | dict = "", task_limit: int = 300, speed: bool = False,
                  generate: bool = False):
    """SuiteOptions for `frugal eval`, after checking the text and the task names (one-line errors)."""
    from frugal.calibrate import read_text
    from frugal.evaluation.suite import SuiteOptions
    from frugal.evaluation.tasks import TASKS

    read_text(protocol.text)
    if not isinstance(tasks, dict):
        tasks = {t: (task_limit or None) for t in _split(tasks) if t}
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise FrugalError(f"--tasks {unknown[0]}: known tasks are {', '.join(TASKS)}")
    return SuiteOptions(protocol=protocol, tasks=tasks, speed=speed, generate=generate)


def write_results(results: dict, output: str | Path | None = None, json_out: str | Path | None = None) -> None:
    """results.json to `json_out`; results.json and report.html into the directory `output`."""
    payload = json.dumps(results, indent=2) + "\n"
    if json_out:
        from frugal.atomic import write_text_atomic

        write_text_atomic(json_out, payload)
    if output:
        from frugal.atomic import atomic_dir
        from frugal.report.html import render_html

        with atomic_dir(output, overwrite=True) as tmp:
            (tmp / "results.json").write_text(payload)
            (tmp / "report.html").write_text(render_html(results))
        log.info("wrote %s/results.json and report.html", output)


def evaluate(models: Any, tokenizer: Any = None, protocol: Any = None, ref: Any = None, ref_name: str = "reference",
             *, text: str | Path | None = None, eval_tokens: int = EVAL_TOKENS, seq_len: int = 512,
             tasks: str | list[str] | dict = "", task_limit: int = 300, speed: bool = False, generate: bool = False,
             full: bool = False, allow_pickle: bool = False, output: str | Path | None = None,
             json_out: str | Path | None = None) -> Any:
    """Evaluate models side by side on the same tokens.

    `models` a dict name -> loaded model: `frugal.evaluation.metrics.evaluate(models, tokenizer, protocol,
    ref, ref_name)` (the earlier `frugal.evaluate`), a list of EvalResult; `protocol` defaults to
    `eval_protocol(text, seq_len, eval_tokens)`.

    Otherwise `models` is a model spec or a list of them (directories, .gguf files, "default") and `ref`
    a spec: `frugal eval` (perplexity, KL and top-1 against `ref`, per-block error, zero-shot `tasks`
    limited to `task_limit` items (0 = all), `speed`, `generate`; `full` = the whole text and every item),
    returning results.json's content; `output` also gets results.json and report.html, `json_out` a copy
    of results.json.
    """
    if isinstance(models, dict):
        from frugal.evaluation.metrics import evaluate as run

        return run(models, tokenizer, protocol or eval_protocol(text, seq_len, eval_tokens), ref=ref,
                   ref_name=ref_name)
    from frugal.atomic import check_output_dir
    from frugal.evaluation.suite import run_suite

    specs = [models] if isinstance(models, (str, os.PathLike)) or models is None else list(models)
    specs = [None if s is None else str(s) for s in specs]
    if full:
        eval_tokens, task_limit = 10**9, 0
    opts = suite_options(protocol or eval_protocol(text, seq_len, eval_tokens), tasks, task_limit, speed, generate)
    if output:
        check_output_dir(output, overwrite=True, sources=(*specs, ref))
    results = run_suite(specs, None if ref is None else str(ref), opts, allow_pickle=allow_pickle)
    write_results(results, output, json_out)
    return results
