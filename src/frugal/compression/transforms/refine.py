"""Block-wise output-error refinement as a registered transform: the float block's outputs are taken at
the block's start (its targets), and after rounding the codes, scales and optionally norm weights are
refined towards them (frugal.quant.refine)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from frugal.compression.hooks import run_batched
from frugal.compression.inplace import assign
from frugal.compression.transforms.base import BlockContext, Place, Transform
from frugal.quant.error import rel_errors

log = logging.getLogger(__name__)


@torch.no_grad()
def _targets(ctx: BlockContext) -> None:
    """The float block's outputs on its inputs, unless the engine carries the float model's own."""
    if ctx.targets is None:
        ctx.targets = run_batched(ctx.block, ctx.hidden, ctx.args, ctx.kw, ctx.recipe.calibration.batch_size)


@torch.no_grad()
def _refine(ctx: BlockContext) -> None:
    """Refine a quantized block's codes and scales (and with recipe.refine.norms its float parameters)
    and put the result in the block, the quantized weights and the layer reports."""
    from frugal.quant.refine import refine_block

    if not ctx.quantized:
        return
    cut = len(ctx.prefix) + 1
    res = refine_block(ctx.block, {n[cut:]: qw for n, qw in ctx.quantized.items()},
                       {n[cut:]: w for n, w in ctx.float_weights.items()}, ctx.hidden, ctx.targets, ctx.args, ctx.kw,
                       ctx.recipe.refine, desc=ctx.prefix)
    log.info("%s: refined output error %.4g -> %.4g (%d steps, %.1f s, %.2f%% of codes moved)", ctx.prefix,
             res.initial_loss, res.final_loss, res.iters, res.seconds, 100 * res.moved)
    for rel, value in res.params.items():
        assign(ctx.block.get_parameter(rel), value)
    for rel, qw in res.weights.items():
        name = f"{ctx.prefix}.{rel}"
        if qw is ctx.quantized[name]:
            continue
        w_hat = qw.dequantize(ctx.layers[name].weight.dtype)
        w_err, out_err = rel_errors(ctx.float_weights[name], w_hat, ctx.hessians.get(name))
        ctx.reports[name] = dataclasses.replace(ctx.reports[name], weight_rel_error=w_err, output_rel_error=out_err)
        ctx.quantized[name] = qw
        assign(ctx.layers[name].weight, w_hat)


TRANSFORM = Transform(name="refine", summary="SignRound-style refinement of codes and scales on each block's output",
                      enabled=lambda recipe: recipe.refine.enabled, float_targets=True, float_weights=True,
                      steps={Place.BLOCK_START: _targets, Place.AFTER_QUANTIZE: _refine},
                      ggml="refinement moves integer-grid codes only",
                      streaming="refinement carries the float model's activations beside the quantized ones; use "
                      "the in-memory path")
