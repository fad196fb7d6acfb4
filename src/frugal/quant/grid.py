"""Integer grids: per-group scales and zero points, quantize and dequantize.

Codes are signed integers in [-2^(b-1), 2^(b-1) - 1], the convention compressed-tensors stores:
    q = clamp(round(w / s) + z, qmin, qmax),    w_hat = (q - z) * s
Symmetric grids have z = 0. By default (`signed`) the group's signed extreme (its largest-magnitude
weight, with its sign) lands on the lowest code: s = extreme / -2^(b-1), negative when the extreme is
positive, so every one of the 2^b levels is used (llama.cpp's Q4_0 and NNCF's INT4_SYM do this). With
`signed=False`, s = max|w| / ((2^b - 1) / 2) as in the reference GPTQ code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugal.quant.options import ClipSearch, WeightScheme
from frugal.errors import FrugalError


def qrange(bits: int) -> tuple[int, int]:
    """Smallest and largest signed code of a `bits`-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass
class QuantizedWeight:
    """A quantized (out, in) weight: integer codes plus one scale (and zero point) per group."""

    q: torch.Tensor  # (out, in) int8 codes
    scale: torch.Tensor  # (out, n_groups), dtype of the stored scales
    zero_point: torch.Tensor | None  # (out, n_groups) int8, None for symmetric grids
    bits: int
    group_size: int  # -1: one group spans all inputs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight that every loader reconstructs: (q - z) * s, computed in float32."""
        gs = self.q.shape[1] if self.group_size == -1 else self.group_size
        s = self.scale.float().repeat_interleave(gs, dim=1)  # (out, in)
        q = self.q.float()
        if self.zero_point is not None:
            q = q - self.zero_point.float().repeat_interleave(gs, dim=1)
        return (q * s).to(dtype)

    def nbytes(self) -> int:
        """Storage of the packed codes, scales and zero points (bits exactly, no padding)."""
        n = self.q.numel() * self.bits / 8 + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            n += self.zero_point.numel() * self.bits / 8
        return int(n)


def group_size_of(scheme: WeightScheme, in_features: int) -> int:
    return in_features if scheme.group_size == -1 else scheme.group_size


def params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
    signed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float, same shape as xmin) covering [xmin, xmax] (xmin <= 0 <= xmax);
    `signed` symmetric grids put the signed extreme on the lowest code (see the module docstring)."""
    qmin, qmax = qrange(bits)
    if symmetric and signed:
        scale = torch.where(xmin.abs() >= xmax, xmin, xmax) / qmin  # extreme / qmin lands on qmin
    elif symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        scale = amax / ((qmax - qmin) / 2)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
    zero = torch.zeros_like(scale)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    big = torch.finfo(scale_dtype).max
    scale = scale.clamp(-big, big).to(scale_dtype).float()  # quantize against the scale the file will hold
    mag = scale.abs().clamp_min(torch.finfo(scale_dtype).tiny)  # a tiny range must not underflow to 0
    scale = torch.where(scale < 0, -mag, mag)
    if not symmetric:
        zero = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `w` on the grid (scale, zero); all three broadcast, result float."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w / scale) + zero, qmin, qmax)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def group_params(
    wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, clip: ClipSearch | None = None,
    signed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `wg` (rows, g); with `clip`, the MSE-optimal shrunk range."""
    xmin = wg.min(dim=1).values.clamp(max=0)
    xmax = wg.max(dim=1).values.clamp(min=0)
    scale, zero = params_from_range(xmin, xmax, bits, symmetric, scale_dtype, signed)
    if clip is None or not clip.enabled:
        return scale, zero
    best = (fake_quantize(wg, scale[:, None], zero[:, None], bits) - wg).pow(2).sum(1)
    for p in torch.linspace(1.0, clip.max_shrink, clip.grid + 1)[1:].tolist():
        s, z = params_from_range(xmin * p, xmax * p, bits, symmetric, scale_dtype, signed)
        err = (fake_quantize(wg, s[:, None], z[:, None], bits) - wg).pow(2).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def grid_for(
    w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype, clip: ClipSearch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point of a whole (out, in) weight: two (out, n_groups) tensors."""
    out_f, in_f = w.shape
    gs = group_size_of(scheme, in_f)
    if in_f % gs:
        raise FrugalError(f"in_features {in_f} is not a multiple of group size {gs}")
    n_groups = in_f // gs
    wg = w.float().reshape(out_f * n_groups, gs)  # (out * n_groups, gs)
    scale, zero = group_params(wg, scheme.bits, scheme.symmetric, scale_dtype, clip, scheme.signed_scale)
    return scale.reshape(out_f, n_groups), zero.reshape(out_f, n_groups)


def pack_result(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype
) -> QuantizedWeight:
    """Wrap float codes and grids into a QuantizedWeight with storage dtypes."""
    return QuantizedWeight(
        q=codes.to(torch.int8),
        scale=scale.to(scale_dtype),
        zero_point=None if scheme.symmetric else zero.to(torch.int8),
        bits=scheme.bits,
        group_size=scheme.group_size,
    )
