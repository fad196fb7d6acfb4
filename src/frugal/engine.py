"""Block-sequential compression: the glue between a transformers model and the pure algorithms.

1. Capture what the first decoder block receives for every calibration sample (hidden states plus
   whatever positional and keyword arguments the architecture passes), and the keyword arguments of
   every block (masks or rotary embeddings may differ per block, e.g. sliding-window layers).
2. For each block: hook its linear layers to accumulate Hessians, quantize them, re-run the block
   with the quantized weights, and feed those outputs to the next block.
Only one block's inputs and outputs are held beyond the model itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .blocks import block_linears, find_blocks, outside_linears
from .config import Recipe
from .errors import FrugalError
from .quant.gptq import Hessian, gptq_ggml, gptq_quantize
from .quant.grid import QuantizedWeight
from .quant.ggml import make_grid
from .quant.rtn import rtn_quantize

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class LayerReport:
    """What quantizing one linear layer cost."""

    bits: int
    group_size: int
    symmetric: bool
    weight_rel_error: float  # ||W - Q||_F / ||W||_F
    output_rel_error: float | None  # tr(dW H dW^T) / tr(W H W^T) on calibration inputs; None without H
    gptq_loss: float | None = None
    damp: float | None = None
    seconds: float = 0.0
    ggml_type: str | None = None  # set when the layer was rounded onto a GGML grid (recipe.gguf_type)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class BlockInputs:
    """Inputs of the current block: hidden states per sample and the call's other arguments."""

    hidden: list[torch.Tensor]  # each (1, seq, hidden)
    args: tuple  # positional arguments after the hidden states
    kwargs_per_block: list[dict[str, Any]] = field(default_factory=list)


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Separate the hidden states from a block call's other arguments."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor) -> BlockInputs:
    """Run the model on (n, seq) token ids far enough to record every block's call arguments."""
    calls: list[dict] = [{} for _ in blocks]
    first: dict[str, Any] = {}

    def probe(i: int):
        def hook(_mod, args, kwargs):
            hidden, rest, kw = _split_hidden(args, kwargs)
            calls[i] = _detach(kw)
            if i == 0:
                first["hidden"], first["args"] = hidden.detach().clone(), _detach(rest)
        return hook

    handles = [b.register_forward_pre_hook(probe(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(samples[:1], use_cache=False)  # one full pass records every block's kwargs
    finally:
        for h in handles:
            h.remove()
    hidden = [first["hidden"]]

    def stop_at_first(_mod, args, kwargs):
        hidden.append(_split_hidden(args, kwargs)[0].detach().clone())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
    try:
        for i in range(1, samples.shape[0]):
            try:
                model(samples[i : i + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden, args=first["args"], kwargs_per_block=calls)


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class InputHooks:
    """Accumulate something about each linear layer's inputs (`new(x)` makes an accumulator, `add(acc, x)`
    feeds it); layers fed the very same tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self, layers: dict[str, nn.Linear], new: Callable, add: Callable):
        self.layers, self._new, self._add = layers, new, add
        self.acc: dict[str, Any] = {}
        self._owner: dict[str, str] = {}  # layer -> layer whose accumulator it shares
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            if name not in self._owner:  # first call decides sharing
                seen = self._seen.get(id(x))
                if seen is not None and seen[1] is x:
                    self._owner[name] = seen[0]
                    self.acc[name] = self.acc[seen[0]]
                    return
                self._owner[name] = name
                self._seen[id(x)] = (name, x)
                self.acc[name] = self._new(x)
            if self._owner[name] == name:
                self._add(self.acc[name], x)
        return hook

    def __enter__(self) -> "InputHooks":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def end_sample(self) -> None:
        self._seen.clear()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


class HessianHooks(InputHooks):
    """Accumulate the Hessian of each linear layer's inputs (shared by layers fed the same tensor)."""

    def __init__(self, layers: dict[str, nn.Linear]):
        super().__init__(layers, lambda x: Hessian(x.shape[-1], device=x.device), lambda h, x: h.add(x))

    @property
    def hessians(self) -> dict[str, Hessian]:
        return self.acc


def _quantize_weight(name: str, w: torch.Tensor, recipe: Recipe, h: torch.Tensor | None, ggml: str | None):
    """(quantized weight, gptq loss, damp) for one (out, in) weight."""
    if ggml is not None:
        if recipe.method == "gptq" and h is not None:
            res = gptq_ggml(w, h, ggml, recipe.gptq, name=name)
            return res.weight, res.loss, res.damp
        return make_grid(w, ggml), None, None
    scheme = recipe.scheme_for(name)
    sdt = scheme.torch_scale_dtype(w.dtype)
    if recipe.method == "gptq":
        res = gptq_quantize(w, h, scheme, recipe.gptq, recipe.clip, sdt, name=name)
        return res.weight, res.loss, res.damp
    if recipe.method == "hqq":
        from .quant.hqq import hqq_quantize

        return hqq_quantize(w, scheme, sdt, **dataclasses.asdict(recipe.hqq)), None, None
    return rtn_quantize(w, scheme, recipe.clip, sdt), None, None


def _rel_errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> tuple[float, float | None]:
    """(||W - W_hat|| / ||W||, tr(dW H dW^T) / tr(W H W^T) or None without a Hessian) for (out, in) weights."""
    w = w.float()
    dw = w - w_hat.float()  # (out, in)
    out_err = None
    if h is not None:
        out_err = float(torch.einsum("oi,ij,oj->", dw, h, dw) / torch.einsum("oi,ij,oj->", w, h, w).clamp_min(1e-30))
    return float(dw.norm() / w.norm().clamp_min(1e-30)), out_err


def quantize_layer(name: str, lin: nn.Module, recipe: Recipe, h: torch.Tensor | None,
                   ggml: str | None = None) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize one linear layer in place (its weight becomes the dequantized grid values); `ggml`
    names the GGML type to round onto when the recipe targets a GGUF file type."""
    t0 = time.perf_counter()
    w = lin.weight.data
    if not torch.isfinite(w).all():
        raise FrugalError(f"{name}: weight has NaN or Inf values")
    qw, loss, damp = _quantize_weight(name, w, recipe, h, ggml)
    w_hat = qw.dequantize(w.dtype)
    w_err, out_err = _rel_errors(w, w_hat, h)
    report = LayerReport(
        bits=qw.bits, group_size=qw.group_size, symmetric=qw.zero_point is None,
        weight_rel_error=w_err, output_rel_error=out_err, gptq_loss=loss, damp=damp, ggml_type=ggml,
    )
    lin.weight.data = w_hat
    report.seconds = time.perf_counter() - t0
    return qw, report


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, recipe: Recipe, hidden: list[torch.Tensor] | None, args: tuple,
                   kw: dict, ggml_types: dict[str, str],
                   targets: list[torch.Tensor] | None = None) -> tuple[dict, dict, list[torch.Tensor] | None]:
    """Quantize one decoder block in place: (quantized weights, layer reports, the block's outputs on
    `hidden` with its quantized weights). `hidden` is None for methods that need no calibration data.
    With `recipe.awq.enabled`, AWQ scales (and clips) the block's weights first, on `hidden`. With
    `recipe.refine.enabled`, the quantized weights are then refined (quant.refine) towards `targets`, the
    float model's outputs of this block (when None: the block's own float outputs on `hidden`)."""
    if recipe.refine.enabled:
        if hidden is None:
            raise FrugalError(f"{prefix}: recipe.refine needs calibration inputs, but none were given")
        if targets is None:
            targets = [run_block(block, x, args, kw) for x in hidden]
    if recipe.awq.enabled:
        from .awq import apply_awq

        if hidden is None:
            raise FrugalError(f"{prefix}: recipe.awq needs calibration inputs, but none were given")
        apply_awq(block, prefix, recipe, hidden, args, kw)
    layers = block_linears(block, prefix, recipe.ignore)
    quantized: dict[str, QuantizedWeight] = {}
    reports: dict[str, LayerReport] = {}
    hessians: dict[str, torch.Tensor] = {}
    if hidden is not None and recipe.method == "gptq":
        with HessianHooks(layers) as hooks:
            for x in hidden:
                run_block(block, x, args, kw)
                hooks.end_sample()
        hessians = {name: hooks.hessians[name].matrix() for name in layers}
        del hooks
        _check_inputs_finite(hessians, prefix)
    float_weights = {name: lin.weight.data for name, lin in layers.items()}  # quantize_layer rebinds .data
    for name, lin in layers.items():
        quantized[name], reports[name] = quantize_layer(name, lin, recipe, hessians.get(name), ggml_types.get(name))
    if recipe.refine.enabled and quantized:
        _refine(block, prefix, recipe, layers, quantized, reports, float_weights, hessians, hidden, targets, args, kw)
    if hidden is None:
        return quantized, reports, None
    out = [run_block(block, x, args, kw) for x in hidden]
    _check_finite(out, prefix)
    return quantized, reports, out


def _refine(block, prefix, recipe, layers, quantized, reports, float_weights, hessians, hidden, targets, args,
            kw) -> None:
    """Refine a quantized block's codes and scales (and with recipe.refine.norms its float parameters;
    quant.refine) and put the result in the block, the quantized weights and the layer reports."""
    from .quant.refine import refine_block

    cut = len(prefix) + 1
    res = refine_block(block, {n[cut:]: qw for n, qw in quantized.items()},
                       {n[cut:]: w for n, w in float_weights.items()}, hidden, targets, args, kw, recipe.refine,
                       desc=prefix)
    log.info("%s: refined output error %.4g -> %.4g (%d steps, %.1f s, %.2f%% of codes moved)", prefix,
             res.initial_loss, res.final_loss, res.iters, res.seconds, 100 * res.moved)
    for rel, value in res.params.items():
        block.get_parameter(rel).data = value
    for rel, qw in res.weights.items():
        name = f"{prefix}.{rel}"
        if qw is quantized[name]:
            continue
        w_hat = qw.dequantize(layers[name].weight.dtype)
        w_err, out_err = _rel_errors(float_weights[name], w_hat, hessians.get(name))
        reports[name] = dataclasses.replace(reports[name], weight_rel_error=w_err, output_rel_error=out_err)
        quantized[name] = qw
        layers[name].weight.data = w_hat


@torch.no_grad()
def _gptq_blocks(model, blocks_name, blocks, recipe, samples, quantized, reports, ggml_types) -> None:
    """Every block from the calibration inputs; with recipe.refine, the float model's hidden states are
    carried beside the quantized model's, and each block's float outputs are its refinement targets."""
    inputs = capture_block_inputs(model, blocks, samples)
    float_hidden = inputs.hidden if recipe.refine.enabled else None  # the float model's input to block i
    for i, block in enumerate(tqdm(blocks, desc=recipe.method, unit="block")):
        kw = inputs.kwargs_per_block[i]
        targets = None if float_hidden is None else [run_block(block, x, inputs.args, kw) for x in float_hidden]
        q, r, inputs.hidden = quantize_block(block, f"{blocks_name}.{i}", recipe, inputs.hidden, inputs.args, kw,
                                             ggml_types, targets)
        float_hidden = targets
        quantized.update(q)
        reports.update(r)


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
def _outside(model, layers, recipe, samples, quantized, reports, ggml_types) -> None:
    """Quantize linear layers outside the blocks (e.g. lm_head) with inputs from the quantized model."""
    hessians: dict[str, Hessian] = {}
    if recipe.method == "gptq":
        with HessianHooks(layers) as hooks:
            for i in tqdm(range(samples.shape[0]), desc="outside-block layers", unit="sample"):
                model(samples[i : i + 1], use_cache=False)
                hooks.end_sample()
        hessians = hooks.hessians
        _check_inputs_finite({n: h.matrix() for n, h in hessians.items()}, "the layers outside the blocks")
    for name, lin in layers.items():
        _untie(model, name, lin)
        h = hessians[name].matrix() if name in hessians else None
        quantized[name], reports[name] = quantize_layer(name, lin, recipe, h, ggml_types.get(name))


@torch.no_grad()
def compress_model(
    model: nn.Module, recipe: Recipe, samples: torch.Tensor | None
) -> tuple[dict[str, QuantizedWeight], dict[str, LayerReport]]:
    """Quantize `model` in place following `recipe` (checked by api.check_plan); `samples` are (n, seq)
    calibration token ids."""
    blocks_name, blocks = find_blocks(model)
    quantized: dict[str, QuantizedWeight] = {}
    reports: dict[str, LayerReport] = {}
    ggml_types = gguf_layer_types(model, recipe) if recipe.gguf_type else {}
    if recipe.needs_calibration:  # GPTQ, AWQ and refinement need each block's inputs
        if samples is None:
            raise FrugalError(f"recipe (method {recipe.method}, awq {recipe.awq.enabled}, refine "
                              f"{recipe.refine.enabled}) needs calibration samples, but none were given")
        samples = samples.to(_device_of(model))
        _gptq_blocks(model, blocks_name, blocks, recipe, samples, quantized, reports, ggml_types)
    else:
        for i, block in enumerate(tqdm(blocks, desc=recipe.method, unit="block")):
            q, r, _ = quantize_block(block, f"{blocks_name}.{i}", recipe, None, (), {}, ggml_types)
            quantized.update(q)
            reports.update(r)
    outside = outside_linears(model, blocks_name, recipe.ignore)
    if outside:
        _outside(model, outside, recipe, samples, quantized, reports, ggml_types)
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
    from .blocks import quantizable_linears
    from .quant.ggml_policy import layer_type

    n_layers = len(find_blocks(model)[1])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    mods = {**quantizable_linears(model, recipe.ignore), **_embedding_and_head(model)}
    types = {n: recipe.ggml_override(n) or layer_type(recipe.gguf_type, n, n_layers, tied, m.weight.shape[1])
             for n, m in mods.items()}
    from .quant.ggml import TYPES

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
