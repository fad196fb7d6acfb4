"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): quantize columns one at a time, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian.

H = 2/n * sum_t x_t x_t^T over the layer's calibration inputs x_t (in,).  Columns are visited in
order of decreasing diag(H) when `act_order` is set ("activation order"); the grids are then fixed
from the original weights before any update ("static groups"), so group g still covers inputs
[g*gs, (g+1)*gs) in the file.  Updates inside a block of `block_size` columns are applied lazily.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from frugal.quant.options import ClipSearch, GPTQOptions, WeightScheme
from frugal.errors import FrugalError
from frugal.quant.grid import QuantizedWeight, grid_for, group_params, group_size_of, pack_result, quantize_codes

log = logging.getLogger(__name__)


class Hessian:
    """Running H = 2/n X^T X of a layer's inputs; `add` takes (..., in) activations."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.xtx += (x.T @ x).double()
        self.n += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.n == 0:
            raise FrugalError("GPTQ needs calibration inputs, but this layer saw none")
        return (2.0 / self.n * self.xtx).float()


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # sum over columns of (w - q)^2 / [H^-1]_jj / 2, the GPTQ objective's estimate
    damp: float  # dampening fraction that made H positive definite


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, or None if not positive definite."""
    n = h.shape[0]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        return None
    hinv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    return None if info.item() != 0 else upper


def inverse_hessian(h: torch.Tensor, opts: GPTQOptions, name: str) -> tuple[torch.Tensor, float]:
    """Dampened inverse-Hessian factor; a failed Cholesky retries with 10x the dampening."""
    damp = opts.dampening
    for attempt in range(opts.max_damp_retries + 1):
        upper = _upper_inverse_cholesky(h, damp)
        if upper is not None:
            if attempt:
                log.warning("%s: Cholesky failed, succeeded with dampening %.3g", name, damp)
            return upper, damp
        damp *= 10
    raise FrugalError(f"{name}: Hessian is not positive definite even with dampening {damp / 10:.3g}")


def _dead_inputs(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of (in, in) `h` with the diagonal of always-zero inputs set to 1, and their (in,) mask."""
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def _zero_dead(w: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """A float32 copy of (out, in) `w` with the weights of dead inputs (they carry no information) at 0."""
    w = w.float().clone()
    w[:, dead] = 0.0
    return w


def _without_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of (out, in) `w` and (in, in) `h` without dead inputs (_dead_inputs, _zero_dead)."""
    h, dead = _dead_inputs(h)
    return _zero_dead(w, dead), h


def column_order(h: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Order of the columns: decreasing diag(H) ("activation order"), or as they are."""
    return torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0])


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: WeightScheme,
    opts: GPTQOptions,
    clip: ClipSearch | None = None,
    scale_dtype: torch.dtype | None = None,
    name: str = "layer",
) -> GPTQResult:
    """Quantize an (out, in) weight `w` given its (in, in) Hessian `h`."""
    return gptq_quantize_shared([w], h, scheme, opts, clip, scale_dtype, [name])[0]


def row_slices(rows: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each weight's rows in their stack."""
    ends = list(itertools.accumulate(rows))
    return [(e - r, e) for r, e in zip(rows, ends)]


def gptq_quantize_shared(
    ws: list[torch.Tensor],
    h: torch.Tensor,
    scheme: WeightScheme,
    opts: GPTQOptions,
    clip: ClipSearch | None = None,
    scale_dtype: torch.dtype | None = None,
    names: list[str] | None = None,
) -> list[GPTQResult]:
    """Quantize (out_k, in) weights that read the same inputs (q/k/v, gate/up) and so share the Hessian
    `h`: one inverse-Hessian factor and one column sweep over their stacked rows. GPTQ treats rows
    independently, and the sweep runs its row reductions and lazy-batch GEMMs weight by weight, so each
    result equals gptq_quantize's on that weight alone, bit for bit."""
    names = names or [f"layer{k}" for k in range(len(ws))]
    scale_dtype = scale_dtype or ws[0].dtype
    h, dead = _dead_inputs(h)  # once for all the weights
    prepared = [_zero_dead(w, dead) for w in ws]
    rows = row_slices([w.shape[0] for w in prepared])
    in_f = h.shape[0]
    gs = group_size_of(scheme, in_f)

    static = opts.act_order or gs == in_f
    if static:  # grids from the original weights, weight by weight
        grids = [grid_for(w, scheme, scale_dtype, clip) for w in prepared]  # (out_k, n_groups) each
        scale, zero = torch.cat([g[0] for g in grids]), torch.cat([g[1] for g in grids])
    w = torch.cat(prepared) if len(prepared) > 1 else prepared[0]  # (out, in)
    if not static:
        scale = torch.zeros(w.shape[0], in_f // gs)
        zero = torch.zeros_like(scale)
    perm = column_order(h, opts.act_order)
    w, h = w[:, perm], h[perm][:, perm]
    group_of = (perm // gs).tolist()  # group of each permuted column
    hinv, damp = inverse_hessian(h, opts, ", ".join(names))

    def quant_col(x: torch.Tensor, col: int, w1t: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = group_of[col]
        if not static and col % gs == 0:  # dynamic groups: grid from the updated weights, weight by weight
            for a, b in rows:
                wg = w1t[i : i + gs, a:b].T.contiguous()  # (out_k, gs), laid out as a weight alone has it
                scale[a:b, g], zero[a:b, g] = group_params(wg, scheme.bits, scheme.symmetric, scale_dtype, clip,
                                                           scheme.signed_scale)
        q = quantize_codes(x, scale[:, g], zero[:, g], scheme.bits)  # (out,)
        return q, (q - zero[:, g]) * scale[:, g]

    block = math.ceil(opts.block_size / gs) * gs if not static else opts.block_size
    codes, losses = gptq_loop(w, hinv, block, quant_col, rows)
    codes = codes[:, torch.argsort(perm)]
    return [GPTQResult(weight=pack_result(codes[a:b], scale[a:b], zero[a:b], scheme, scale_dtype), loss=loss,
                       damp=damp) for (a, b), loss in zip(rows, losses)]


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside (restored after)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Rows at or below which the per-column updates run on one thread: each is a few small element-wise ops,
# which threads only slow down (on 2 cores shared with another process, 30x: 0.12 s against 4.0 s for a
# 576 x 576 layer). Element-wise results do not depend on the thread count, so neither do the bytes.
SINGLE_THREAD_ROWS = 8192


def gptq_loop(w: torch.Tensor, hinv: torch.Tensor, block: int, quant_col,
              rows: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, list[float]]:
    """The GPTQ column sweep over (out, in) `w` (already permuted) with inverse-Hessian factor `hinv`.

    `quant_col(x, j, w1t, i)` returns the codes and grid values (out,) of column j (row i of the current
    lazy batch w1t, held transposed (B, out) so that a column is contiguous). `rows`: the [start, end)
    row ranges of the stacked weights (default: one weight). Returns the codes (out, in) and each weight's
    GPTQ loss estimate. The column loop runs on one thread (SINGLE_THREAD_ROWS), the lazy-batch update
    between blocks on all of them, one GEMM per weight (the shapes a weight alone would give).
    """
    out_f, in_f = w.shape
    rows = rows or [(0, out_f)]
    codes = torch.zeros_like(w)
    losses = torch.zeros(out_f, dtype=torch.float64)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1t = w[:, i1:i2].T.contiguous()  # (B, out): this lazy batch's columns, each one contiguous
        err1t = torch.zeros_like(w1t)
        hinv1 = hinv[i1:i2, i1:i2]
        with threads(1 if out_f <= SINGLE_THREAD_ROWS else torch.get_num_threads()):
            for i in range(i2 - i1):
                q, value = quant_col(w1t[i], i1 + i, w1t, i)
                codes[:, i1 + i] = q
                e = (w1t[i] - value) / hinv1[i, i]
                ed = e.double()
                losses += ed * ed / 2  # (w - q)^2 / d^2 / 2 (a product: the same bits on any thread count)
                w1t[i:] -= hinv1[i, i:][:, None] * e[None, :]
                err1t[i] = e
        err1 = err1t.T.contiguous()  # (out, B)
        for a, b in rows:
            w[a:b, i2:] -= err1[a:b] @ hinv[i1:i2, i2:]
    return codes, [float(losses[a:b].clone().sum()) for a, b in rows]


def gptq_ggml(w: torch.Tensor, h: torch.Tensor, type_name: str, opts: GPTQOptions, name: str = "layer"):
    """GPTQ onto a GGML block grid (Q4_K, Q4_0, ...): the grid is fixed up front from the original
    weights (range search weighted by (|w| + rms) x diag H), then every column is rounded onto it with error
    feedback. Returns a GGMLWeight whose codes the GGUF file stores exactly."""
    from frugal.quant.ggml import TYPES, GGMLWeight, codes_on, make_grid, values_on

    t = TYPES[type_name]
    w, h = _without_dead_inputs(w, h)
    grid = make_grid(w, type_name, importance=torch.diag(h))
    perm = column_order(h, opts.act_order)
    hinv, damp = inverse_hessian(h[perm][:, perm], opts, name)
    sub_of = perm // t.sub
    b = grid.offset

    def quant_col(x: torch.Tensor, col: int, _w1, _i) -> tuple[torch.Tensor, torch.Tensor]:
        g = int(sub_of[col])
        s, o = grid.scale[:, g], None if b is None else b[:, g]
        q = codes_on(x, s, o, t)
        return q, values_on(q, s, o)

    codes, (loss,) = gptq_loop(w[:, perm], hinv, opts.block_size, quant_col)
    q = codes[:, torch.argsort(perm)].to(torch.int8)
    return GPTQResult(weight=GGMLWeight(type_name, q, grid.scale, grid.offset, grid.fields), loss=loss, damp=damp)
