"""Budgeted mixed precision: analyse a model (or reuse the cached analysis), choose a format per layer
within a size budget (`plan_budget`) or a KL limit (`compress_within_kl`), and give the recipe with
per-layer overrides. `frugal compress --budget/--max-kl` and `frugal.compress(budget=..., max_kl=...)`
both run these."""

from __future__ import annotations

import logging
from typing import Any, Callable

from frugal.errors import FrugalError

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("int2g32,int3g32,int3g64,int4g32,int4g64,int8g64,bf16,fp8_e4m3,fp8_e5m2,mxfp4,nvfp4,"
                   "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K")
DEFAULT_MEASURE = "int3g64,int4g64"
ANALYSIS_SAMPLES, ANALYSIS_LEN = 4, 128  # the analysis tokens the plan's KL is predicted (and measured) on
MAX_KL_ROUNDS = 3


def analysis_method(method: str) -> str:
    """How the analysis rounds candidates for a compression `method`: with Hessians (GPTQ, as the
    compression will) when the method needs them, else to nearest."""
    from frugal.compression import methods

    return "gptq" if methods.get(method).needs_hessian else "rtn"


def analysis_formats(recipe) -> list[str]:
    """Candidates analysed for --budget/--max-kl: all default formats for rounding to nearest (one cached
    analysis serves every target); with a Hessian method, which costs a GPTQ run per layer and format, only
    the formats the plan can pick (integer grids, or GGML types for a GGUF target) plus the measured ones."""
    from frugal.analysis.analyze import parse_candidate
    from frugal.compression import methods

    names = DEFAULT_FORMATS.split(",")
    if not methods.get(recipe.method).needs_hessian:
        return names
    keep = (lambda c: bool(c.ggml)) if recipe.gguf_type else (lambda c: c.scheme is not None)
    return [n for n in names if keep(parse_candidate(n)) or n in DEFAULT_MEASURE.split(",")]


def split_names(candidates: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """A list from "a,b" or a sequence of names; None when empty."""
    if not candidates:
        return None
    return candidates.split(",") if isinstance(candidates, str) else list(candidates)


def mixed_planner(model, recipe, *, tokenizer=None, source=None, calibration: Any = None,
                  candidates: str | list[str] | None = None, budget: str | None = None,
                  samples=None) -> tuple[Callable[[float | None], tuple[Any, dict]], Any]:
    """Analyse `model` (cached by `source`, its directory or file, when given) and return (planner,
    samples): planner(max_kl) gives the recipe with per-layer overrides for `budget` (max_kl None) or for a
    KL target, plus the plan summary. `samples`: the analysis token ids (default 4 x 128 tokens of the
    default text). Hessian methods take their Hessians from `calibration` (text file, token ids, default
    text; none for "data-free")."""
    import torch

    from frugal.analysis.analyze import analyze, cached_analyze
    from frugal.analysis.mixed import apply, plan
    from frugal.calibrate import default_text, from_text
    from frugal.compression import methods
    from frugal.evaluation.sizes import model_bytes
    from frugal.load.blocks import quantizable_linears

    def text_ids(path, n: int, seq_len: int):
        if tokenizer is None:
            raise FrugalError("mixed precision: the analysis needs a tokenizer to read text (or token ids)")
        return from_text(tokenizer, path, n, seq_len, recipe.seed)

    if samples is None:
        samples = text_ids(default_text(), ANALYSIS_SAMPLES, ANALYSIS_LEN)
    hessian_samples = None
    data_free = calibration is False or (isinstance(calibration, str) and calibration == "data-free")
    if methods.get(recipe.method).needs_hessian and not data_free:  # damage as GPTQ does it, Hessians
        if isinstance(calibration, torch.Tensor):                     # from the compression's calibration
            hessian_samples = calibration.long()
        else:
            c = recipe.calibration
            hessian_samples = text_ids(calibration or default_text(), c.num_samples, c.seq_len)
    args = (samples, analysis_formats(recipe), DEFAULT_MEASURE.split(","), recipe.ignore)
    kw = dict(method=analysis_method(recipe.method), hessian_samples=hessian_samples, gptq=recipe.gptq)
    if source is not None:
        analysis, _ = cached_analyze(model, source, *args, **kw)
    else:
        analysis = analyze(model, *args, **kw)
    linears = quantizable_linears(model, recipe.ignore)
    float_bytes = model_bytes(model) - sum(l.weight.numel() * l.weight.element_size() for l in linears.values())
    cands = split_names(candidates)

    def planner(max_kl):
        p = plan(analysis, None if max_kl is not None else budget, max_kl, cands, float_bytes=float_bytes,
                 ggml=bool(recipe.gguf_type))
        log.info("mixed precision: %.3f bits/weight, predicted KL %.4g, %s", p.bpw, p.predicted_kl,
                 p.to_dict()["count"])
        return apply(recipe, p), p.to_dict()
    return planner, samples


def plan_budget(model, recipe, *, budget: str, tokenizer=None, source=None, calibration: Any = None,
                candidates: str | list[str] | None = None, samples=None) -> tuple[Any, dict]:
    """(recipe with one override per layer, plan summary): the least predicted KL within `budget`
    ("3.5bpw": the quantized layers, scales included; "200MB": the whole checkpoint)."""
    from frugal.config import as_recipe

    planner, _ = mixed_planner(model, as_recipe(recipe), tokenizer=tokenizer, source=source,
                               calibration=calibration, candidates=candidates, budget=budget, samples=samples)
    return planner(None)


def compress_within_kl(model, recipe, max_kl: float, compress: Callable[[Any], Any], *, tokenizer=None, source=None,
                       calibration: Any = None, candidates: str | list[str] | None = None, samples=None):
    """(Compressed, plan summary) for the smallest allocation whose KL on the analysis tokens is <= max_kl:
    plan on the predicted KL, compress, measure, and tighten the prediction's target until the measured KL
    is within the limit (at most MAX_KL_ROUNDS compressions). `compress(recipe)` compresses a copy of
    `model` (frugal.compress without inplace), so `model` is left as it was."""
    from frugal.analysis import mixed
    from frugal.config import as_recipe

    planner, samples = mixed_planner(model, as_recipe(recipe), tokenizer=tokenizer, source=source,
                                     calibration=calibration, candidates=candidates, samples=samples)
    target, kl = max_kl, None
    for rnd in range(1, MAX_KL_ROUNDS + 1):
        try:
            r, plan_dict = planner(target)
        except FrugalError as e:
            if kl is None:
                raise FrugalError(f"--max-kl {max_kl}: {e}") from None
            raise FrugalError(f"--max-kl {max_kl}: measured KL {kl:.4g}, and no allocation of the candidates "
                              "predicts less; raise the limit or add formats with more bits (--candidates)") from None
        result = compress(r)
        kl = mixed.measured_kl(model, result.model, samples)
        log.info("--max-kl round %d: target %.4g, measured KL %.4g", rnd, target, kl)
        if kl <= max_kl:
            return result, {**plan_dict, "max_kl": max_kl, "measured_kl": kl, "rounds": rnd}
        target *= max_kl / kl
    raise FrugalError(f"--max-kl {max_kl}: measured KL was still {kl:.4g} after {MAX_KL_ROUNDS} rounds; "
                      "raise the limit or add formats with more bits (--candidates)")
