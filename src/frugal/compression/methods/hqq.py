"""HQQ (Badri & Shaji, 2023): half-quadratic solver for scales and zero points, calibration-free."""

from __future__ import annotations

import dataclasses

from frugal.compression.methods.base import Method, Quantized


def quantize(w, h, scheme, recipe, scale_dtype, name):
    from frugal.quant.hqq import hqq_quantize

    return Quantized(hqq_quantize(w, scheme, scale_dtype, **dataclasses.asdict(recipe.hqq)))


METHOD = Method(name="hqq", summary="half-quadratic solver, calibration-free", quantize=quantize, options="hqq",
                clip=False, refusal="its solver chooses the range itself (no recipe.clip) and rounds integer grids "
                "only (no recipe.gguf_type)")
