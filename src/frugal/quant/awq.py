"""AWQ (Lin et al., 2023, arXiv:2306.00978): activation-aware weight quantization, the maths.

A linear layer y = W x computes the same with W diag(s) and inputs x / s. Input channels whose
activations are large matter most; scaling their weights up by s = a^alpha (a = mean |x| per input
channel) before rounding gives them finer relative precision. alpha is searched on a grid minimising
the output error on calibration inputs X,

    L(s) = sum over the layers fed x of || (Q(W diag(s)) diag(s)^-1 - W) X ||^2,

written with the Gram matrix G = X^T X / n as tr(dW G dW^T), so the cost of one grid point does not
grow with the number of tokens; where fewer tokens were sampled than the layer has inputs (n < in, the
down projection of a wide MLP), with the sampled inputs themselves, ||X dW^T||^2 / n, which is then the
cheaper product (n x in x out against in x in x out). The clip search then shrinks each group's range, again minimising
the output error of that group (dW_g G_gg dW_g^T) rather than the weight error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from frugal.quant.options import WeightScheme
from frugal.quant.grid import params_from_range, fake_quantize, group_size_of
from frugal.quant.rtn import rtn_quantize

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # (out, in) weight -> its dequantized grid values


class ActivationStats:
    """Running mean |x| per input channel and Gram matrix G = X^T X / n of a layer's inputs; while no more
    tokens were seen than the layer has inputs, the sampled inputs too (`sample_rows`)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0
        self.rows: list[torch.Tensor] | None = []  # the sampled (tokens, in) inputs, while tokens <= in
        self._row_scale = torch.ones(in_features, device=device)  # 1 / the scales folded since

    def add(self, x: torch.Tensor, max_tokens: int | None = None) -> None:
        """Accumulate (..., in) activations, keeping at most `max_tokens` evenly spaced tokens."""
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if max_tokens is not None and x.shape[0] > max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).round().long().to(x.device)]
        self.abs_sum += x.abs().sum(0).double()
        self.xtx += (x.T @ x).double()
        self.n += x.shape[0]
        if self.rows is not None and self.n > self.xtx.shape[0]:
            self.rows = None  # more tokens than inputs: the Gram form is the cheaper one from here on
        elif self.rows is not None:
            self.rows.append(x.clone())

    def sample_rows(self) -> torch.Tensor | None:
        """X / sqrt(n), (n, in) float32, of the sampled inputs (as rescaled), or None once n > in."""
        if not self.rows:
            return None
        return torch.cat(self.rows) * self._row_scale / math.sqrt(self.n)

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()  # (in,)

    def gram(self) -> torch.Tensor:
        return (self.xtx / max(self.n, 1)).float()  # (in, in)

    def rescale(self, s: torch.Tensor) -> None:
        """The statistics of x / s, for inputs whose producer was divided by s."""
        self._row_scale = self._row_scale / s.float()
        s = s.double()
        self.abs_sum /= s
        self.xtx /= s[:, None] * s[None, :]


def rtn_quantizer(scheme: WeightScheme, scale_dtype: torch.dtype | None = None) -> Quantizer:
    """Q(w) for round-to-nearest onto `scheme` (no clipping), as dequantized float32 weights."""
    return lambda w: rtn_quantize(w, scheme, None, scale_dtype or w.dtype).dequantize(torch.float32)


def output_error(dw: torch.Tensor, gram: torch.Tensor | None, rows: torch.Tensor | None = None) -> float:
    """tr(dW G dW^T) = mean over tokens of ||dW x||^2, for (out, in) dW: from (in, in) G, or where given
    from rows = X / sqrt(n), (n, in), as ||rows dW^T||^2 (the same sum, cheaper when n < in)."""
    if rows is not None:
        return float(((rows @ dw.T) ** 2).sum(dtype=torch.float64))
    return float(((dw @ gram) * dw).sum(dtype=torch.float64))


def awq_scales(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^alpha per input channel, normalised so that max(s) * min(s) = 1."""
    a = a.float().clamp_min(float(a.max()) * 1e-5 + 1e-12)  # a dead channel must not give s = 0
    s = a.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # (in,) s: weights become W diag(s), inputs x / s
    alpha: float
    loss: float  # L(s) at the chosen alpha
    loss_identity: float  # L(1): plain quantization without scaling


def search_scales(weights: list[torch.Tensor], quantizers: list[Quantizer], a: torch.Tensor,
                  gram: torch.Tensor | None, grid: int, rows: torch.Tensor | None = None) -> ScaleSearch:
    """The s = a^alpha, alpha in {0, 1/grid, ..., (grid-1)/grid}, minimising the summed output error
    of the (out_i, in) `weights` fed the same inputs (mean |x| `a`; Gram `gram`, or the sampled inputs
    `rows` = X / sqrt(n) where given: output_error). Ties keep the smaller alpha, so uniform activations
    give alpha = 0 (s = 1)."""
    best: ScaleSearch | None = None
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(a, alpha)  # (in,)
        loss = sum(output_error(q(w.float() * s) / s - w.float(), gram, rows) for w, q in zip(weights, quantizers))
        if best is None or loss < best.loss:
            best = ScaleSearch(s, alpha, loss, best.loss_identity if best else loss)
    return best


def _group_ranges(wg: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Full range per group row of (rows, gs) `wg`, as the grid helpers cover it (0 included)."""
    lo, hi = wg.min(dim=1).values.clamp(max=0), wg.max(dim=1).values.clamp(min=0)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi)
        lo, hi = -amax, amax
    return lo, hi


def search_clip(w: torch.Tensor, gram: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype,
                grid: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group range [lo, hi] (two (out, n_groups) tensors) among the full range shrunk by factors
    in [max_shrink, 1] (`grid` + 1 points) that minimises each group's output error dw_g G_gg dw_g^T."""
    out_f, in_f = w.shape
    gs = group_size_of(scheme, in_f)
    n_groups = in_f // gs
    wg = w.float().reshape(out_f * n_groups, gs)  # (out * n_groups, gs)
    idx = torch.arange(n_groups)
    g_diag = gram.reshape(n_groups, gs, n_groups, gs)[idx, :, idx, :]  # (n_groups, gs, gs) diagonal blocks
    lo0, hi0 = _group_ranges(wg, scheme.symmetric and not scheme.signed_scale)
    best = torch.full((out_f * n_groups,), math.inf)
    lo, hi = lo0.clone(), hi0.clone()
    for p in torch.linspace(1.0, max_shrink, grid + 1).tolist():
        s, z = params_from_range(lo0 * p, hi0 * p, scheme.bits, scheme.symmetric, scale_dtype,
                                scheme.signed_scale)
        clipped = torch.minimum(torch.maximum(wg, lo0[:, None] * p), hi0[:, None] * p)
        dw = (fake_quantize(clipped, s[:, None], z[:, None], scheme.bits) - wg).reshape(out_f, n_groups, gs)
        err = torch.einsum("ogi,gij,ogj->og", dw, g_diag, dw).reshape(-1)  # (out * n_groups,)
        better = err < best
        best = torch.where(better, err, best)
        lo, hi = torch.where(better, lo0 * p, lo), torch.where(better, hi0 * p, hi)
        if max_shrink == 1.0:
            break
    return lo.reshape(out_f, n_groups), hi.reshape(out_f, n_groups)


def clip_weight(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(out, in) `w` clamped to its group ranges (lo, hi: (out, n_groups))."""
    gs = w.shape[1] // lo.shape[1]
    return torch.minimum(torch.maximum(w, lo.repeat_interleave(gs, 1).to(w.dtype)),
                         hi.repeat_interleave(gs, 1).to(w.dtype))
