"""Half-Quadratic Quantization (HQQ, Badri & Shaji 2023): calibration-free grids, made exportable.

HQQ minimises the sparsity-promoting l_p norm (p < 1) of the weight error ||W - (q - z)·s||_p^p with a
half-quadratic splitting: an error variable W_e and a penalty beta that grows by kappa per iteration,

    q   = clamp(round(W / s + z))               codes of the current grid
    W_e = shrink_p(W - (q - z)·s, beta)         generalized soft-thresholding (sub-problem 1),
                                                shrink_p(x) = sign(x)·relu(|x| - |x|^(p-1) / beta)
    s,z = argmin ||W - W_e - (q - z)·s||²       closed form (sub-problem 2; the paper's zero update,
                                                z = mean(q - (W - W_e)/s), is its z half)

frugal stores an integer zero point, so the solver's float zero is rounded down and up, the scale is
solved again at each integer zero, then refitted by least squares for its codes (codes re-rounded) a
few times. Symmetric grids solve the scale alone with z = 0. Every group keeps whichever of RTN and
these candidates has the smallest squared error, so HQQ never loses to RTN on weight error. Scales are
rounded to `scale_dtype` before any code is decided, as in grid.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from frugal.quant.options import HQQOptions, WeightScheme
from frugal.errors import FrugalError
from frugal.quant.grid import QuantizedWeight, group_params, group_size_of, pack_result, qrange, quantize_codes

_TINY = 1e-30  # |err| floor before |err|^(p-1), so an exact zero error shrinks to 0, not NaN
_RTOL = 1e-3  # a group leaves the solver once its l_p error drops by less than this fraction


def _store(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scale as the file will hold it (float32 values), never 0, its sign kept (signed symmetric grids)."""
    s = s.to(scale_dtype).float()
    mag = s.abs().clamp_min(torch.finfo(scale_dtype).tiny)
    return torch.where(s < 0, -mag, mag)


def _sq_err(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error per group of the integer grid (s, z): wg (rows, g), s and z (rows, 1) -> (rows, 1)."""
    return (wg - (quantize_codes(wg, s, z, bits) - z) * s).pow(2).sum(1, keepdim=True)


def half_quadratic(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, fit: Callable,
                   opts: HQQOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's solver for min ||W - (q - z)·s||_p^p over every group (row of wg) at once.

    `fit(q - z, W - W_e, s, z)` is the closed-form grid for a fixed error variable W_e. Each group keeps
    its grid of smallest l_p error and leaves the loop as soon as that error stops decreasing (by
    `_RTOL`); the loop ends when no group is left or after `opts.iters` iterations."""
    qmin, qmax = qrange(bits)
    best_s, best_z = s.clone(), z.clone()
    rows = torch.arange(wg.shape[0])  # groups still improving
    best, beta = torch.full_like(s, float("inf")), opts.beta
    for _ in range(opts.iters):
        d = (wg / s).add_(z).round_().clamp_(qmin, qmax).sub_(z)  # (rows, g) code offsets q - z
        err = wg - d * s
        a = err.abs()
        a_p1 = a.clamp_min(_TINY).pow_(opts.lp_norm - 1)
        obj = (a * a_p1).sum(1, keepdim=True)  # sum |err|^p, (rows, 1)
        keep = (obj < best * (1 - _RTOL))[:, 0]
        best_s[rows[keep]], best_z[rows[keep]] = s[keep], z[keep]
        best = obj
        if not keep.all():
            rows, wg, d, err, a, a_p1, best, s, z = (t[keep] for t in (rows, wg, d, err, a, a_p1, obj, s, z))
            if rows.numel() == 0:
                break
        w_e = err.sign_().mul_(a.sub_(a_p1.div_(beta)).clamp_min_(0.0))  # sign·relu(|err| - |err|^(p-1)/beta)
        s, z = fit(d, wg - w_e, s, z)
        beta *= opts.kappa
    return best_s, best_z


def _fit_scale_zero(scale_dtype: torch.dtype) -> Callable:
    """Sub-problem 2 in scale and zero: least squares W - W_e ≈ (q - z)·s for fixed codes q."""
    def fit(d, w_t, s, z):
        dc = d - d.mean(1, keepdim=True)
        var, cov = dc.pow(2).sum(1, keepdim=True), (dc * w_t).sum(1, keepdim=True)
        s_new = _store(cov / torch.where(var > 0, var, 1.0), scale_dtype)
        s_new = torch.where((var > 0) & (cov > 0), s_new, s)
        return s_new, z + d.mean(1, keepdim=True) - w_t.mean(1, keepdim=True) / s_new
    return fit


def _fit_scale(scale_dtype: torch.dtype) -> Callable:
    """Sub-problem 2 in the scale alone (zero fixed): s = <W - W_e, q - z> / |q - z|²."""
    def fit(d, w_t, s, z):
        dd = d.pow(2).sum(1, keepdim=True)
        s_new = _store((w_t * d).sum(1, keepdim=True) / torch.where(dd > 0, dd, 1.0), scale_dtype)
        return torch.where((dd > 0) & (s_new * s > 0), s_new, s), z  # the sign of s is kept
    return fit


def refit_scale(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, scale_dtype: torch.dtype,
                refits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale for the codes of the integer grid (s, z), codes re-rounded, `refits` times.

    Returns the scale of smallest squared error seen per group and that error, both (rows, 1)."""
    d = quantize_codes(wg, s, z, bits) - z  # (rows, g) code offsets q - z
    best_s, best = s, (wg - d * s).pow_(2).sum(1, keepdim=True)
    for _ in range(refits):
        dd = d.pow(2).sum(1, keepdim=True)
        s_ls = (wg * d).sum(1, keepdim=True) / torch.where(dd > 0, dd, 1.0)
        s = torch.where((dd > 0) & (s_ls * s > 0), _store(s_ls, scale_dtype), s)
        d = quantize_codes(wg, s, z, bits) - z
        err = (wg - d * s).pow_(2).sum(1, keepdim=True)
        best_s, best = torch.where(err < best, s, best_s), torch.minimum(err, best)
    return best_s, best


def hqq_groups(wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
               opts: HQQOptions, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (rows,) of every row of wg (rows, g): the best of RTN and HQQ."""
    qmin, qmax = qrange(bits)
    s0, z0 = (t[:, None] for t in group_params(wg, bits, symmetric, scale_dtype, signed=signed))  # RTN grid, (rows, 1)
    if symmetric:
        zeros = [z0]
    else:
        s0_h, z_h = half_quadratic(wg, s0, z0, bits, _fit_scale_zero(scale_dtype), opts)
        zeros = [torch.floor(z_h).clamp(qmin, qmax), torch.ceil(z_h).clamp(qmin, qmax)]
    best_s, best_z, best = s0, z0, _sq_err(wg, s0, z0, bits)
    for z in zeros:
        s, _ = half_quadratic(wg, s0 if symmetric else s0_h, z, bits, _fit_scale(scale_dtype), opts)
        s, err = refit_scale(wg, s, z, bits, scale_dtype, opts.refits)
        better = err < best
        best_s, best_z, best = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(err, best)
    return best_s[:, 0], best_z[:, 0]


def hqq_quantize(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype | None = None,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    refits: int = 2,
) -> QuantizedWeight:
    """Quantize an (out, in) weight to `scheme` with HQQ, no calibration data; in every group the squared
    weight error is at most RTN's."""
    opts = HQQOptions(iters, lp_norm, beta, kappa, refits)
    opts.validate("hqq")
    scale_dtype = scale_dtype or w.dtype
    out_f, in_f = w.shape
    gs = group_size_of(scheme, in_f)
    if in_f % gs:
        raise FrugalError(f"in_features {in_f} is not a multiple of group size {gs}")
    wg = w.float().reshape(-1, gs)  # (out * n_groups, gs)
    scale, zero = hqq_groups(wg, scheme.bits, scheme.symmetric, scale_dtype, opts, scheme.signed_scale)
    scale, zero = scale.reshape(out_f, -1), zero.reshape(out_f, -1)  # (out, n_groups)
    codes = quantize_codes(w.float(), scale.repeat_interleave(gs, 1), zero.repeat_interleave(gs, 1), scheme.bits)
    return pack_result(codes, scale, zero, scheme, scale_dtype)
