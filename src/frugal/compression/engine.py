"""Block-sequential compression: the glue between a transformers model and the pure algorithms.

1. Capture what the first decoder block receives for every calibration sample (hidden states plus
   whatever positional and keyword arguments the architecture passes), and the keyword arguments of
   every block (masks or rotary embeddings may differ per block, e.g. sliding-window layers).
2. For each block: hook its linear layers to accumulate Hessians, quantize them, re-run the block
   with the quantized weights, and feed those outputs to the next block.
Only one block's inputs and outputs are held beyond the model itself.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from frugal.compression import methods, transforms
from frugal.compression.timing import stage
from frugal.compression.result import LayerReport
from frugal.compression.statistics import Statistics, choose_hessians
from frugal.compression.hooks import HessianHooks, capture_block_inputs, feed_batched, run_batched, run_block
from frugal.compression.inplace import assign
from frugal.compression.transforms.base import BlockContext, Place
from frugal.load.blocks import block_linears, find_blocks, outside_linears
from frugal.load.experts import ExpertLinears
from frugal.load.linears import as_linears
from frugal.load.lazy import fixed_mmap_threshold
from frugal.config import Recipe
from frugal.errors import FrugalError
from frugal.quant.error import rel_errors
from frugal.quant.gptq import Hessian
from frugal.quant.grid import QuantizedWeight

log = logging.getLogger(__name__)


def _quantize_weight(name: str, w: torch.Tensor, recipe: Recipe, h: torch.Tensor | None, ggml: str | None):
    """The registered method's rounding of one (out, in) weight: onto the GGML type `ggml` when the recipe
    targets GGUF, else onto the layer's integer scheme; a layer that needs a Hessian but has none
    (compression.statistics) takes the method's `no_hessian` fallback."""
    method = methods.get(recipe.method)
    if h is None and method.needs_hessian:
        method = methods.get(method.no_hessian, f"recipe.method={method.name} no_hessian")
    if ggml is not None:
        return method.quantize_ggml(w, h, ggml, recipe, name)
    scheme = recipe.scheme_for(name)
    return method.quantize(w, h, scheme, recipe, recipe.scale_dtype_for(scheme, w.dtype), name)


def _check_weight(name: str, lin: nn.Module) -> None:
    if not torch.isfinite(lin.weight.data).all():
        raise FrugalError(f"{name}: weight has NaN or Inf values")


def _apply(name: str, lin: nn.Module, res, h: torch.Tensor | None, ggml: str | None,
           seconds: float) -> tuple[QuantizedWeight, LayerReport]:
    """Write the dequantized grid values into the layer's weight (in place); the layer's report."""
    qw, w = res.weight, lin.weight.data
    w_hat = qw.dequantize(w.dtype)
    w_err, out_err = rel_errors(w, w_hat, h)
    report = LayerReport(
        bits=qw.bits, group_size=qw.group_size, symmetric=qw.zero_point is None,
        weight_rel_error=w_err, output_rel_error=out_err, gptq_loss=res.loss, damp=res.damp, ggml_type=ggml,
        seconds=seconds,
    )
    assign(lin.weight, w_hat)  # in place: the loaded weight's pages are reused, not kept beside a copy
    return qw, report


def quantize_layer(name: str, lin: nn.Module, recipe: Recipe, h: torch.Tensor | None,
                   ggml: str | None = None) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize one linear layer in place (its weight becomes the dequantized grid values); `ggml`
    names the GGML type to round onto when the recipe targets a GGUF file type."""
    t0 = time.perf_counter()
    _check_weight(name, lin)
    res = _quantize_weight(name, lin.weight.data, recipe, h, ggml)
    return _apply(name, lin, res, h, ggml, time.perf_counter() - t0)


def shared_groups(layers: dict[str, nn.Linear], hessians: dict[str, torch.Tensor], recipe: Recipe,
                  ggml_types: dict[str, str]) -> list[list[str]]:
    """The layers in order, grouped where one `quantize_shared` call rounds them together: the method has
    one, they share one Hessian tensor (q/k/v, gate/up), integer grids with the same scheme and scale
    dtype. Every other layer is a group of its own."""
    shared = methods.get(recipe.method).quantize_shared is not None
    groups: dict[tuple, list[str]] = {}
    for name, lin in layers.items():
        h = hessians.get(name)
        key: tuple = (name,)
        if shared and h is not None and name not in ggml_types:
            scheme = recipe.scheme_for(name)
            key = (id(h), scheme, recipe.scale_dtype_for(scheme, lin.weight.dtype), lin.weight.dtype)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def quantize_group(names: list[str], layers: dict[str, nn.Linear], recipe: Recipe, h: torch.Tensor
                   ) -> dict[str, tuple[QuantizedWeight, LayerReport]]:
    """Quantize layers that share the Hessian `h` in one `quantize_shared` call (see shared_groups)."""
    t0 = time.perf_counter()
    for name in names:
        _check_weight(name, layers[name])
    scheme = recipe.scheme_for(names[0])
    ws = [layers[n].weight.data for n in names]
    results = methods.get(recipe.method).quantize_shared(ws, h, scheme, recipe,
                                                         recipe.scale_dtype_for(scheme, ws[0].dtype), names)
    seconds = (time.perf_counter() - t0) / len(names)
    return {n: _apply(n, layers[n], res, h, None, seconds) for n, res in zip(names, results)}


def quantize_layers(layers: dict[str, nn.Linear], recipe: Recipe, hessians: dict[str, torch.Tensor],
                    ggml_types: dict[str, str]) -> dict[str, tuple[QuantizedWeight, LayerReport]]:
    """Every layer of a block, those sharing a Hessian in one call; results in the layers' order."""
    done: dict[str, tuple[QuantizedWeight, LayerReport]] = {}
    for names in shared_groups(layers, hessians, recipe, ggml_types):
        if len(names) > 1:
            done.update(quantize_group(names, layers, recipe, hessians[names[0]]))
        else:
            name = names[0]
            done[name] = quantize_layer(name, layers[name], recipe, hessians.get(name), ggml_types.get(name))
    return {name: done[name] for name in layers}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_steps(ctx: BlockContext, place: Place) -> None:
    for name, step in transforms.named_steps_at(ctx.recipe, place):
        with stage(name):
            step(ctx)


def _expert_groups_of(layers: dict[str, nn.Linear], block: nn.Module) -> dict[str, ExpertLinears]:
    """The block's ExpertLinears by the name `layers` gives them (`<group>.<e>.<proj>` -> `<group>`)."""
    names = {id(m): n for n, m in layers.items()}
    groups = {}
    for ex in (m for m in block.modules() if isinstance(m, ExpertLinears)):
        for e in range(ex.num_experts):
            name = names.get(id(getattr(ex.expert(e), ex.in_proj))) or names.get(id(ex.expert(e).down_proj))
            if name is not None:
                groups[name.rsplit(".", 2)[0]] = ex
                break
    return groups


@torch.no_grad()
def block_hessians(layers: dict[str, nn.Linear], block: nn.Module, hidden, args: tuple, kw: dict,
                   where: str, batch_size: int = 1) -> tuple[dict[str, torch.Tensor | None], dict[str, Statistics]]:
    """H = 2/n X^T X of each layer's inputs over the block's calibration inputs (shared where the input is;
    MoE experts from their routed tokens, with the fallbacks of compression.statistics: None where a
    layer is rounded without one), and the Statistics of the layers that needed a rule."""
    with HessianHooks(layers) as hooks:
        feed_batched(block, hidden, args, kw, batch_size, hooks)
    groups = _expert_groups_of(layers, block)
    chosen, stats = choose_hessians(layers, hooks.hessians, groups)
    matrices: dict[int, torch.Tensor] = {}  # one matrix per accumulator: layers fed the same input share it
    hessians = {name: None if acc is None else matrices.setdefault(id(acc), acc.matrix())
                for name, acc in chosen.items()}
    _check_inputs_finite({n: h for n, h in hessians.items() if h is not None}, where)
    return hessians, stats


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, recipe: Recipe, hidden: list[torch.Tensor] | None, args: tuple,
                   kw: dict, ggml_types: dict[str, str],
                   targets: list[torch.Tensor] | None = None) -> tuple[dict, dict, list[torch.Tensor] | None]:
    """Quantize one decoder block in place: (quantized weights, layer reports, the block's outputs on
    `hidden` with its quantized weights). `hidden` is None for recipes that need no calibration data.
    The enabled transforms' steps run at their places (transforms.Place); `targets` are the float
    model's outputs of this block where the engine carries them (refinement), else None."""
    if hidden is None:
        for t in transforms.enabled(recipe):
            if t.needs_calibration:
                raise FrugalError(f"{prefix}: recipe.{t.name} needs calibration inputs, but none were given")
    ctx = BlockContext(block, prefix, recipe, hidden, args, kw, targets)
    _run_steps(ctx, Place.BLOCK_START)
    _run_steps(ctx, Place.BEFORE_QUANTIZE)
    ctx.layers = block_linears(block, prefix, recipe.ignore)
    statistics: dict[str, Statistics] = {}
    if hidden is not None and methods.get(recipe.method).needs_hessian:
        with stage("statistics"):
            ctx.hessians, statistics = block_hessians(ctx.layers, block, hidden, args, kw, prefix,
                                                      recipe.calibration.batch_size)
    if transforms.float_weights(recipe):  # rounding writes into the weights: keep the float ones for the steps
        ctx.float_weights = {name: lin.weight.data.clone() for name, lin in ctx.layers.items()}
    with stage("solve"):
        for name, (qw, report) in quantize_layers(ctx.layers, recipe, ctx.hessians, ggml_types).items():
            ctx.quantized[name], ctx.reports[name] = qw, report
            if name in statistics:
                report.tokens, report.statistics = statistics[name].tokens, statistics[name].source
    _run_steps(ctx, Place.AFTER_QUANTIZE)
    if hidden is None:
        return ctx.quantized, ctx.reports, None
    with stage("re-run"):
        out = run_batched(block, hidden, args, kw, recipe.calibration.batch_size)
    _check_finite(out, prefix)
    return ctx.quantized, ctx.reports, out


@torch.no_grad()
def _calibrated_blocks(model, blocks_name, blocks, recipe, samples, quantized, reports, ggml_types) -> None:
    """Every block from the calibration inputs; where a transform needs float targets (refinement), the
    float model's hidden states are carried beside the quantized model's, and each block's float outputs
    are its targets."""
    with stage("capture"):
        inputs = capture_block_inputs(model, blocks, samples)
    recipe = batchable(recipe, blocks, inputs)
    float_hidden = inputs.hidden if transforms.float_targets(recipe) else None  # the float model's input to block i
    for i, block in enumerate(tqdm(blocks, desc=recipe.method, unit="block")):
        kw = inputs.kwargs_per_block[i]
        targets = None
        if float_hidden is not None:
            with stage("float targets"):
                targets = run_batched(block, float_hidden, inputs.args, kw, recipe.calibration.batch_size)
        try:
            q, r, inputs.hidden = quantize_block(block, f"{blocks_name}.{i}", recipe, inputs.hidden, inputs.args, kw,
                                                 ggml_types, targets)
        except (KeyError, IndexError, TypeError, ValueError) as e:  # the family's own forward, run out of its loop
            log.debug("block %s.%d", blocks_name, i, exc_info=True)
            raise FrugalError(f"{type(model).__name__}: block {blocks_name}.{i} fails when run on its own with the "
                              f"arguments its decoder passed ({type(e).__name__}: {str(e)[:80]}); frugal's block-by-"
                              f"block calibration does not support this decoder (RTN without calibration may)") from e
        float_hidden = targets
        quantized.update(q)
        reports.update(r)


@torch.no_grad()
def batchable(recipe: Recipe, blocks: nn.ModuleList, inputs) -> Recipe:
    """`recipe`, or a copy with one sequence per block call when the blocks' captured arguments do not
    broadcast over a batch (bloom's alibi, masks some families build per batch): probed on two samples of
    each block class. Only the batching changes: the statistics are per-sample sums either way."""
    import dataclasses

    if recipe.calibration.batch_size == 1 or len(inputs.hidden) < 2:
        return recipe
    seen = set()
    for i, block in enumerate(blocks):
        if type(block) in seen:
            continue
        seen.add(type(block))
        try:
            run_block(block, torch.cat(inputs.hidden[:2]), inputs.args, inputs.kwargs_per_block[i])
        except Exception as e:  # the family's captured arguments are for batch 1
            log.warning("%s: block calls do not take a batch of sequences (%s); calibrating one sequence per call",
                        type(block).__name__, str(e).splitlines()[0][:100])
            return dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, batch_size=1))
    return recipe


def _check_inputs_finite(hessians: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a layer whose calibration inputs held NaN or Inf (the float model overflowed before it)."""
    for name, h in hessians.items():
        if not torch.isfinite(h).all():
            raise FrugalError(f"{name}: NaN or Inf in its input activations (the float model overflows in "
                              f"{where} on the calibration data)")


def _check_finite(hidden: list[torch.Tensor], where: str) -> None:
    if not all(torch.isfinite(h).all() for h in hidden):
        raise FrugalError(f"{where}: block output has NaN or Inf after quantization")


@torch.no_grad()
def _untie(model: nn.Module, name: str, lin: nn.Linear) -> None:
    """Give a tied output head its own weight before quantizing it, so the embedding stays float."""
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is lin.weight:
        lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        log.info("%s: untied from the input embedding to quantize it", name)


@torch.no_grad()
def quantize_outside(model, layers, recipe, samples, quantized, reports, ggml_types) -> None:
    """Quantize linear layers outside the blocks (e.g. lm_head) with inputs from the quantized model."""
    hessians: dict[str, Hessian] = {}
    if methods.get(recipe.method).needs_hessian:
        step = recipe.calibration.batch_size
        with HessianHooks(layers) as hooks:
            for i in tqdm(range(0, samples.shape[0], step), desc="outside-block layers", unit="batch"):
                model(samples[i : i + step], use_cache=False)
                hooks.end_sample()
        hessians = hooks.hessians
        _check_inputs_finite({n: h.matrix() for n, h in hessians.items()}, "the layers outside the blocks")
    for name, lin in layers.items():
        _untie(model, name, lin)
        h = hessians[name].matrix() if name in hessians and hessians[name].n else None
        if h is None and samples is not None and methods.get(recipe.method).needs_hessian:
            log.warning("%s: no calibration input reached it; rounded without a Hessian", name)
        quantized[name], reports[name] = quantize_layer(name, lin, recipe, h, ggml_types.get(name))


@torch.no_grad()
def compress_model(
    model: nn.Module, recipe: Recipe, samples: torch.Tensor | None
) -> tuple[dict[str, QuantizedWeight], dict[str, LayerReport]]:
    """Quantize `model` in place following `recipe` (checked by compression.plan.check_plan); `samples` are
    (n, seq) calibration token ids. MODEL-place transforms have already run (frugal.compress)."""
    fixed_mmap_threshold()  # large temporaries go back to the system when freed (as when streaming)
    as_linears(model)  # each MoE expert and Conv1D an nn.Linear (idempotent; frugal.compress did it)
    blocks_name, blocks = find_blocks(model)
    quantized: dict[str, QuantizedWeight] = {}
    reports: dict[str, LayerReport] = {}
    ggml_types = gguf_layer_types(model, recipe) if recipe.gguf_type else {}
    if recipe.needs_calibration:  # Hessians, activation statistics or float targets need each block's inputs
        if samples is None:
            raise FrugalError(f"recipe ({recipe.describe()}) needs calibration samples, but none were given")
        samples = samples.to(_device_of(model))
        _calibrated_blocks(model, blocks_name, blocks, recipe, samples, quantized, reports, ggml_types)
    else:
        for i, block in enumerate(tqdm(blocks, desc=recipe.method, unit="block")):
            q, r, _ = quantize_block(block, f"{blocks_name}.{i}", recipe, None, (), {}, ggml_types)
            quantized.update(q)
            reports.update(r)
    outside = outside_linears(model, blocks_name, recipe.ignore)
    if outside:
        with stage("outside layers"):
            quantize_outside(model, outside, recipe, samples, quantized, reports, ggml_types)
    if recipe.gguf_type:
        _gguf_rest(model, recipe, quantized, reports, ggml_types)
    return quantized, reports


def _embedding_and_head(model: nn.Module) -> dict[str, nn.Module]:
    """The token embedding and (if not tied to it) the output head, by module name."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out = {names[id(emb)]: emb}
    if head is not None and head.weight is not emb.weight:
        out[names[id(head)]] = head
    return out


def gguf_layer_types(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """GGML type per quantizable linear and per embedding/head, by llama.cpp's rules for the file type."""
    from frugal.load.blocks import quantizable_linears
    from frugal.quant.ggml_policy import layer_type

    n_layers = len(find_blocks(model)[1])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    mods = {**quantizable_linears(model, recipe.ignore), **_embedding_and_head(model)}
    types = {n: recipe.ggml_override(n) or layer_type(recipe.gguf_type, n, n_layers, tied, m.weight.shape[1])
             for n, m in mods.items()}
    from frugal.quant.ggml import TYPES

    for n, t in types.items():
        if mods[n].weight.shape[1] % TYPES[t].block:
            raise FrugalError(f"{n}: {t} needs rows that are a multiple of {TYPES[t].block}; this layer has "
                              f"{mods[n].weight.shape[1]}")
    return types


@torch.no_grad()
def _gguf_rest(model, recipe, quantized, reports, ggml_types) -> None:
    """Round the embedding (and an untied head left in float) onto their GGML types, as llama.cpp
    does, so that the model frugal evaluates is the model the GGUF file holds."""
    for name, mod in _embedding_and_head(model).items():
        if name not in quantized:
            quantized[name], reports[name] = quantize_layer(name, mod, recipe, None, ggml_types[name])
