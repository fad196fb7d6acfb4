"""AWQ glue: folding the scales of each family's scaling pairs (`FamilyRecord.awq` in frugal.families),
and running the search (`frugal.quant.awq`) on one decoder block.

A scaling pair is (preceding op -> linear layers that read its output and nothing else does). Its
scales s multiply the linears' input columns and divide the op's output channels, so the float model
computes exactly the same function:
- a norm: RMSNorm weight w <- w / s, or (1 + w) / s - 1 for norms computing x * (1 + w) (Gemma); a
  LayerNorm's bias is divided as well;
- a linear layer: its output rows (and bias) are divided by s. This is exact when what lies between
  is linear in that output (attention's value path; act(gate) * up) or positively homogeneous (ReLU).
Norms applied to a sublayer's output (Gemma 3's post_*_layernorm) feed the residual and are no targets.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn as nn

from frugal.compression.hooks import InputHooks, feed_batched, run_batched
from frugal.compression.inplace import assign
from frugal.compression.transforms.base import BlockContext, Place, Transform
from frugal.load.blocks import block_linears
from frugal.errors import FrugalError
from frugal.families import FamilyRecord, ScalePair, family, supporting
from frugal.quant.awq import ActivationStats, ScaleSearch, clip_weight, rtn_quantizer, search_clip, search_scales

if TYPE_CHECKING:
    from frugal.config import Recipe

log = logging.getLogger(__name__)


def _family(model_type: str | None, where: str) -> FamilyRecord:
    """The family's record, which has AWQ scaling pairs (frugal.families), or a FrugalError."""
    record = family(model_type)
    if record is None or record.awq is None:
        raise FrugalError(f"{where}: AWQ does not know the model family {model_type!r} "
                          f"(known: {', '.join(sorted(supporting('awq')))}); --no-awq compresses without it")
    return record


def check(model: nn.Module) -> None:
    """Refuse, before any work, a model whose family record has no AWQ scaling pairs."""
    cfg = model.config
    _family(getattr(cfg, "model_type", None), type(model).__name__)


def block_config(block: nn.Module, where: str) -> Any:
    """The transformers config a decoder block's modules carry (its attention keeps one)."""
    cfg = next((m.config for m in block.modules() if hasattr(getattr(m, "config", None), "model_type")), None)
    if cfg is None:
        raise FrugalError(f"{where}: AWQ cannot tell the model family of this block (no config on its modules)")
    return cfg


def scale_pairs(block: nn.Module, cfg: Any, where: str) -> list[ScalePair]:
    """The family's pairs that exist in this block and are exact for its config and widths."""
    pairs = []
    for pair in _family(cfg.model_type, where).awq.pairs:
        if any(getattr(cfg, k, None) != v for k, v in pair.requires):
            continue
        prev = block.get_submodule(pair.prev)
        if getattr(prev, "weight", None) is None:  # a norm without learned weights has nothing to fold into
            log.info("%s: %s has no weight; its pair is skipped", where, pair.prev)
            continue
        width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
        if any(block.get_submodule(n).in_features != width for n in pair.linears):
            log.debug("%s: %s -> %s skipped (widths differ, e.g. grouped-query attention)", where, pair.prev,
                     ", ".join(pair.linears))
            continue
        pairs.append(pair)
    return pairs


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """W <- W diag(s) for `linears` and prev's output channels divided by s: the same function."""
    s = s.float()
    for lin in linears:
        assign(lin.weight, (lin.weight.float() * s[None, :]).to(lin.weight.dtype))  # (out, in)
    if isinstance(prev, nn.Linear):
        assign(prev.weight, (prev.weight.float() / s[:, None]).to(prev.weight.dtype))  # (out, in)
    else:
        assign(prev.weight, ((norm_offset + prev.weight.float()) / s - norm_offset).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        assign(prev.bias, (prev.bias.float() / s).to(prev.bias.dtype))


class StatsHooks:
    """Activation statistics of each hooked linear's input; layers fed the very same tensor share one
    (hooks.InputHooks)."""

    def __init__(self, layers: dict[str, nn.Linear], tokens_per_sample: int, batch_size: int = 1):
        self.layers, self.tokens, self.batch_size = layers, tokens_per_sample, batch_size

    def collect(self, block: nn.Module, hidden: Iterable[torch.Tensor], args: tuple,
                kw: dict) -> dict[str, ActivationStats]:
        with InputHooks(self.layers, lambda x: ActivationStats(x.shape[-1], x.device),
                        lambda st, x: st.add(x, self.tokens)) as hooks:
            feed_batched(block, hidden, args, kw, self.batch_size, hooks)
        return hooks.acc


def _search_pair(block: nn.Module, prefix: str, pair: ScalePair, record: FamilyRecord,
                 stats: dict[str, ActivationStats], recipe: Recipe, quantized: set[str]) -> ScaleSearch | None:
    """Search one pair's scales on the current weights, fold them, and rescale the inputs' statistics."""
    names = [n for n in pair.linears if n in quantized]
    if not names:  # every consumer stays float: nothing to protect
        return None
    ws = [block.get_submodule(n).weight for n in names]
    schemes = [recipe.scheme_for(f"{prefix}.{n}") for n in names]
    qs = [rtn_quantizer(sc, recipe.scale_dtype_for(sc, w.dtype)) for sc, w in zip(schemes, ws)]
    st = stats[names[0]]
    rows = st.sample_rows()  # fewer sampled tokens than inputs: the error from them is the cheaper product
    res = search_scales(ws, qs, st.mean_abs(), st.gram() if rows is None else None, recipe.awq.grid, rows)
    fold_scales(block.get_submodule(pair.prev), [block.get_submodule(n) for n in pair.linears], res.scales,
                record.norm.offset)
    for shared in {id(stats[n]): stats[n] for n in pair.linears}.values():  # each distinct input once
        shared.rescale(res.scales)
    log.debug("%s: %s alpha=%.2f output error %.4g -> %.4g", prefix, pair.prev, res.alpha, res.loss_identity, res.loss)
    return res


def _clip_layer(name: str, lin: nn.Linear, stats: ActivationStats, recipe: Recipe) -> None:
    """Clamp the weight to the per-group ranges that minimise its output error on the block's inputs."""
    scheme = recipe.scheme_for(name)
    w = lin.weight.data
    lo, hi = search_clip(w, stats.gram(), scheme, recipe.scale_dtype_for(scheme, w.dtype), recipe.awq.grid,
                         recipe.awq.max_shrink)
    assign(lin.weight, clip_weight(w, lo, hi))


@torch.no_grad()
def apply_awq(block: nn.Module, prefix: str, recipe: Recipe, hidden: Sequence[torch.Tensor], args: tuple,
              kw: dict) -> dict[str, ScaleSearch]:
    """AWQ on one block in place: scales searched and folded pair by pair, then (with recipe.awq.clip)
    weights clamped to the searched ranges. Returns each scaled pair's search, by preceding op."""
    opts = recipe.awq
    cfg = block_config(block, prefix)
    record = _family(cfg.model_type, prefix)
    pairs = scale_pairs(block, cfg, prefix)
    quantized = {n[len(prefix) + 1:] for n in block_linears(block, prefix, recipe.ignore)}
    consumers = {n for p in pairs for n in p.linears}
    hooked = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and (n in quantized or n in consumers)}
    n = min(len(hidden), opts.max_samples)
    samples = (hidden[i] for i in range(n))  # lazily: `hidden` may be a sequence read from disk
    stats = StatsHooks(hooked, math.ceil(opts.max_tokens / n), recipe.calibration.batch_size).collect(
        block, samples, args, kw)
    searches = {}
    for pair in pairs:
        res = _search_pair(block, prefix, pair, record, stats, recipe, quantized)
        if res is not None:
            searches[pair.prev] = res
    if opts.clip:
        for n in sorted(quantized - set(record.awq.no_clip)):
            if n in stats:  # a MoE expert no calibration token was routed to has nothing to search on
                _clip_layer(f"{prefix}.{n}", block.get_submodule(n), stats[n], recipe)
    return searches


def _before_quantize(ctx: BlockContext) -> None:
    apply_awq(ctx.block, ctx.prefix, ctx.recipe, ctx.hidden, ctx.args, ctx.kw)


TRANSFORM = Transform(name="awq", summary="activation-aware scales (and clip search) folded into the preceding op",
                      enabled=lambda recipe: recipe.awq.enabled, steps={Place.BEFORE_QUANTIZE: _before_quantize},
                      check=lambda model, recipe: check(model), ggml="AWQ searches integer grids only")
