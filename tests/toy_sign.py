"""A toy quantizer for the registry test: one module, registered with one line (`methods.register(METHOD)`).

Sign-only: every weight becomes +s or -s, with s the mean |w| of its group (a 2-bit grid using codes
-1 and +1). Calibration-free, integer grids only.
"""

from __future__ import annotations

import torch

from frugal.compression.methods import Method, Quantized
from frugal.quant.grid import QuantizedWeight


def quantize(w, h, scheme, recipe, scale_dtype, name):
    gs = w.shape[1] if scheme.group_size == -1 else scheme.group_size
    groups = w.float().reshape(w.shape[0], -1, gs)  # (out, n_groups, gs)
    scale = groups.abs().mean(dim=2).to(scale_dtype)  # (out, n_groups)
    q = torch.where(w >= 0, 1, -1).to(torch.int8)  # (out, in)
    return Quantized(QuantizedWeight(q, scale, None, 2, scheme.group_size))


def work_bytes(out_f: int, in_f: int) -> int:
    return 7 * out_f * in_f * 4  # a distinctive cost, so the test can see pre-flight read it


METHOD = Method(name="sign", summary="toy: sign of each weight times its group's mean |w|", quantize=quantize,
                refusal="a toy quantizer of integer grids only", work_bytes=work_bytes)
