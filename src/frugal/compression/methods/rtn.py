"""Round to nearest: each group's grid from its range (optionally MSE-clipped), no calibration."""

from __future__ import annotations

from frugal.compression.methods.base import Method, Quantized


def quantize(w, h, scheme, recipe, scale_dtype, name):
    from frugal.quant.rtn import rtn_quantize

    return Quantized(rtn_quantize(w, scheme, recipe.clip, scale_dtype))


def quantize_ggml(w, h, ggml_type, recipe, name):
    """Round to nearest on a GGML grid (`h` is not used)."""
    from frugal.quant.ggml import make_grid

    return Quantized(make_grid(w, ggml_type))


METHOD = Method(name="rtn", summary="round to nearest, calibration-free", quantize=quantize,
                quantize_ggml=quantize_ggml)
