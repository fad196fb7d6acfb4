"""Round-to-nearest (RTN): every weight to its nearest grid point, optionally with MSE-optimal clipping."""

from __future__ import annotations

import torch

from frugal.quant.options import ClipSearch, WeightScheme
from frugal.quant.grid import QuantizedWeight, grid_for, group_size_of, pack_result, quantize_codes


def rtn_quantize(
    w: torch.Tensor, scheme: WeightScheme, clip: ClipSearch | None = None, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Quantize an (out, in) weight to `scheme` by rounding to nearest."""
    scale_dtype = scale_dtype or w.dtype
    out_f, in_f = w.shape
    gs = group_size_of(scheme, in_f)
    scale, zero = grid_for(w, scheme, scale_dtype, clip)  # (out, n_groups)
    s = scale.repeat_interleave(gs, dim=1)
    z = zero.repeat_interleave(gs, dim=1)
    codes = quantize_codes(w.float(), s, z, scheme.bits)  # (out, in)
    return pack_result(codes, scale, zero, scheme, scale_dtype)
