"""Block-wise output-error refinement of rounding and scales (SignRound, Cheng et al. 2023), the maths.

After a first quantizer (RTN, HQQ or GPTQ, with or without AWQ) has given every linear layer of a
decoder block codes c0, scales s and zero points z, refine them to minimise the block's output error
against the float model's outputs on calibration inputs,

    L(v, m) = sum_x || block(x_q; W_hat) - y_fp ||^2,
    W_hat   = (clamp(round(t0 + v), qmin, qmax) - z) * s * m        (one s, z, m per group)

- t0 is the float weight's position on the grid, w / s + z, when it lies in c0's rounding interval
  (kept 0.01 inside it), else c0 itself: codes that GPTQ moved off the nearest grid point start at the
  centre of their interval, so that a few noisy steps do not undo its error compensation. Hence
  round(t0) = c0, and v = 0, m = 1 IS the first quantizer, bit for bit.
- v in [-0.5, 0.5]: each code moves at most one step from c0. m in SCALE_RANGE per group; the integer
  zero point stays fixed (files need it integer, and moving it by a whole step is not a small change).
- With `norms`, the block's one-dimensional float parameters P (norm weights, biases; stored in float by
  every format) are tuned too, as P * k with per-channel multipliers k in SCALE_RANGE: a norm weight
  scales its input channels of the following linears, which no per-group scale can do.
- Rounding is straight-through; v, m and k follow signed gradient descent, the learning rate decaying
  linearly to 0. Every `eval_every` steps the exact result (codes rounded, scales cast to their stored
  dtype) is measured on held-out samples; the best is kept, and the start when nothing beats it.

Pure over tensors and one block module, which is called through `torch.func.functional_call` and
never modified.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from frugal.quant.options import RefineOptions
from frugal.quant.grid import QuantizedWeight, qrange

log = logging.getLogger(__name__)

SCALE_RANGE = (0.5, 1.5)  # per-group scale multipliers m stay in this range
_MARGIN = 0.01  # t0 stays this far inside c0's rounding interval, so that round(t0) = c0 exactly


@dataclass
class Grid:
    """One layer's fixed quantities, per group: t0 (out, G, gs), s and z (out, G, 1), as float32."""

    start: QuantizedWeight
    t0: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dtype: torch.dtype  # the layer's weight dtype in the block


@dataclass
class RefineResult:
    weights: dict[str, QuantizedWeight]  # by module name inside the block; the start's when nothing improved
    initial_loss: float  # relative output error on the held-out samples, before
    final_loss: float  # and after
    iters: int  # steps taken
    seconds: float
    moved: float  # fraction of codes that differ from the start
    timed_out: bool = False
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # tuned float parameters (`norms`), by name

    def stats(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss, "final_loss": self.final_loss, "iters": self.iters,
                "seconds": self.seconds, "moved": self.moved, "timed_out": self.timed_out}


def _groups(qw: QuantizedWeight) -> tuple[int, int, int]:
    """(out, number of groups, group size) of a quantized weight."""
    out_f, in_f = qw.q.shape
    gs = in_f if qw.group_size == -1 else qw.group_size
    return out_f, in_f // gs, gs


def make_grid(qw: QuantizedWeight, w: torch.Tensor | None, dtype: torch.dtype) -> Grid:
    """The fixed part of one layer's refinement; `w` (out, in) is the float weight the first quantizer
    rounded (None: start at the codes themselves)."""
    out_f, n_g, gs = _groups(qw)
    c0 = qw.q.float().reshape(out_f, n_g, gs)
    scale = qw.scale.float().reshape(out_f, n_g, 1)
    zero = torch.zeros_like(scale) if qw.zero_point is None else qw.zero_point.float().reshape(out_f, n_g, 1)
    if w is None:
        return Grid(qw, c0, scale, zero, dtype)
    off = w.float().reshape(out_f, n_g, gs) / scale + zero - c0  # the float weight's offset from its code
    off = torch.where(off.abs() < 0.5, off.clamp(-0.5 + _MARGIN, 0.5 - _MARGIN), torch.zeros_like(off))
    t0 = c0 + off
    return Grid(qw, t0, scale, zero, dtype)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def soft_weight(g: Grid, v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """(out, in) dequantized weight for offsets v (out, G, gs) and multipliers m (out, G, 1), differentiable
    through straight-through rounding."""
    qmin, qmax = qrange(g.start.bits)
    q = torch.clamp(_round_ste(g.t0 + v), qmin, qmax)  # (out, G, gs)
    s = g.scale if m is None else g.scale * m
    return ((q - g.zero) * s).reshape(g.start.q.shape).to(g.dtype)


@torch.no_grad()
def hard_weight(g: Grid, v: torch.Tensor, m: torch.Tensor | None) -> QuantizedWeight:
    """The exact QuantizedWeight of (v, m): int8 codes in range, scales in the stored dtype."""
    qmin, qmax = qrange(g.start.bits)
    q = torch.clamp(torch.round(g.t0 + v), qmin, qmax).reshape(g.start.q.shape).to(torch.int8)
    scale = g.start.scale
    if m is not None:
        sdt = scale.dtype
        scale = (g.scale * m).reshape(scale.shape).to(sdt).clamp_min(torch.finfo(sdt).tiny)
    return QuantizedWeight(q, scale, g.start.zero_point, g.start.bits, g.start.group_size)


def block_output(block: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, args: tuple,
                 kwargs: dict) -> torch.Tensor:
    """The block's hidden-state output on x with `params` (name -> tensor) in place of its own."""
    out = torch.func.functional_call(block, params, (x, *args), kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def output_error(block: nn.Module, params: dict[str, torch.Tensor], xs: Sequence[torch.Tensor],
                 ys: Sequence[torch.Tensor], args: tuple, kwargs: dict) -> float:
    """sum ||block(x) - y||^2 / sum ||y||^2 over the samples (float64 sums)."""
    num = den = 0.0
    for x, y in zip(xs, ys):
        num += float((block_output(block, params, x, args, kwargs) - y).double().pow(2).sum())
        den += float(y.double().pow(2).sum())
    return num / max(den, 1e-300)


def _split(n: int, opts: RefineOptions) -> tuple[list[int], list[int]]:
    """(held-out, training) sample indices, seeded; all samples train when there are too few to hold out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed)).tolist()
    k = min(opts.eval_samples, n)
    held = sorted(perm[:k])
    return held, (sorted(perm[k:]) if n > k else held)


def _batches(train: list[int], opts: RefineOptions):
    """Endless seeded batches of `batch_size` training indices, a new permutation per epoch."""
    g = torch.Generator().manual_seed(opts.seed + 1)
    while True:
        perm = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
        for i in range(0, len(perm), opts.batch_size):
            yield perm[i : i + opts.batch_size]


def float_params(block: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The block's one-dimensional float parameters other than the quantized layers' weights (norm weights,
    biases), by name."""
    skip = {f"{n}.weight" for n in names}
    return {k: p.detach() for k, p in block.named_parameters()
            if k not in skip and p.dim() == 1 and p.is_floating_point()}


def scaled(free: dict[str, torch.Tensor], k: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """P * k for every tuned float parameter, in P's dtype."""
    return {n: (p.float() * k[n]).to(p.dtype) for n, p in free.items()}


def _sign_step(params: list[torch.Tensor], lr: float, lo: float, hi: float) -> None:
    """p <- clamp(p - lr * sign(grad), lo, hi), then clear the gradient."""
    for p in params:
        if p.grad is not None:
            p.sub_(lr * torch.sign(p.grad)).clamp_(lo, hi)
            p.grad = None


def _descend(block: nn.Module, base: dict, grids: dict[str, Grid], v: dict, m: dict, free: dict, k: dict,
             batch: list, args: tuple, kwargs: dict, lrs: tuple[float, float], decay: float) -> None:
    """One signed-gradient step of offsets v and multipliers m (and k of the float parameters `free`) on the
    batch's summed mean squared error."""
    with torch.enable_grad():
        params = {**base, **scaled(free, k), **{f"{n}.weight": soft_weight(g, v[n], m.get(n)) for n, g in grids.items()}}
        loss = sum((block_output(block, params, x.detach(), args, kwargs) - y.detach()).pow(2).mean()
                   for x, y in batch)
        loss.backward()
    with torch.no_grad():
        _sign_step(list(v.values()), lrs[0] * decay, -0.5, 0.5)
        _sign_step([*m.values(), *k.values()], lrs[1] * decay, *SCALE_RANGE)


def _moved(start: dict[str, QuantizedWeight], new: dict[str, QuantizedWeight]) -> float:
    changed = sum(int((start[n].q != new[n].q).sum()) for n in start)
    return changed / max(sum(start[n].q.numel() for n in start), 1)


def refine_block(block: nn.Module, quantized: dict[str, QuantizedWeight], float_weights: dict[str, torch.Tensor],
                 xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], args: tuple, kwargs: dict,
                 opts: RefineOptions, desc: str = "block") -> RefineResult:
    """Refine the codes (and group scales) of `quantized` (module name inside `block` -> its first
    quantization) so that the block on inputs `xs` comes closer to float targets `ys`. `float_weights`
    (same names, (out, in)) are the weights the first quantizer rounded. With `opts.norms` the block's
    float parameters are tuned too (RefineResult.params). The block is not modified."""
    t_start = time.perf_counter()
    names = sorted(quantized)
    mods = dict(block.named_modules())
    grids = {n: make_grid(quantized[n], float_weights.get(n), mods[n].weight.dtype) for n in names}
    base = {k: p.detach() for k, p in block.named_parameters()}
    held, train = _split(len(xs), opts)
    hx, hy = [xs[i] for i in held], [ys[i] for i in held]

    free = float_params(block, names) if opts.norms else {}

    def loss_of(weights: dict[str, QuantizedWeight], params: dict[str, torch.Tensor]) -> float:
        full = {**base, **params, **{f"{n}.weight": weights[n].dequantize(grids[n].dtype) for n in names}}
        return output_error(block, full, hx, hy, args, kwargs)

    v = {n: torch.zeros_like(grids[n].t0, requires_grad=True) for n in names}
    m = {n: torch.ones_like(grids[n].scale, requires_grad=True) for n in names} if opts.scales else {}
    k = {n: torch.ones_like(p, dtype=torch.float32, requires_grad=True) for n, p in free.items()}
    best, best_params = dict(quantized), {}
    initial = best_loss = loss_of(best, best_params)
    lr, scale_lr = opts.lr, opts.scale_lr or opts.lr
    batches, step, timed_out = _batches(train, opts), 0, False
    bar = tqdm(range(opts.iters), desc=f"refine {desc}", unit="step", leave=False)
    for step in bar:
        batch = [(xs[i], ys[i]) for i in next(batches)]
        _descend(block, base, grids, v, m, free, k, batch, args, kwargs, (lr, scale_lr), 1.0 - step / opts.iters)
        timed_out = opts.max_seconds > 0 and time.perf_counter() - t_start > opts.max_seconds
        if (step + 1) % opts.eval_every == 0 or step + 1 == opts.iters or timed_out:
            cand = {n: hard_weight(grids[n], v[n].detach(), m[n].detach() if m else None) for n in names}
            cand_params = scaled(free, {n: t.detach() for n, t in k.items()})
            cand_loss = loss_of(cand, cand_params)
            log.debug("%s: step %d output error %.6g (best %.6g)", desc, step + 1, cand_loss, best_loss)
            if cand_loss < best_loss:
                best, best_params, best_loss = cand, cand_params, cand_loss
            bar.set_postfix(err=f"{best_loss:.4g}")
        if timed_out:
            log.warning("%s: refinement stopped after %d of %d steps (max_seconds=%g)", desc, step + 1, opts.iters,
                        opts.max_seconds)
            break
    bar.close()
    return RefineResult(best, initial, best_loss, step + 1, time.perf_counter() - t_start,
                        _moved(quantized, best), timed_out, best_params)
