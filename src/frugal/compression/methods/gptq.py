"""GPTQ (Frantar et al., 2022): error-compensating column-by-column rounding with the inputs' Hessian."""

from __future__ import annotations

from frugal.compression.methods.base import FLOAT_BYTES, Method, Quantized


def quantize(w, h, scheme, recipe, scale_dtype, name):
    from frugal.quant.gptq import gptq_quantize

    res = gptq_quantize(w, h, scheme, recipe.gptq, recipe.clip, scale_dtype, name=name)
    return Quantized(res.weight, res.loss, res.damp)


def quantize_shared(ws, h, scheme, recipe, scale_dtype, names):
    """Weights reading the same inputs: one inverse-Hessian factor, one column sweep (same bytes)."""
    from frugal.quant.gptq import gptq_quantize_shared

    results = gptq_quantize_shared(ws, h, scheme, recipe.gptq, recipe.clip, scale_dtype, names=names)
    return [Quantized(r.weight, r.loss, r.damp) for r in results]


def quantize_ggml(w, h, ggml_type, recipe, name):
    """GPTQ onto a GGML grid fixed from the original weights; without a Hessian (embeddings) to nearest."""
    from frugal.compression.methods import rtn
    from frugal.quant.gptq import gptq_ggml

    if h is None:
        return rtn.quantize_ggml(w, h, ggml_type, recipe, name)
    res = gptq_ggml(w, h, ggml_type, recipe.gptq, name=name)
    return Quantized(res.weight, res.loss, res.damp)


def work_bytes(out_f: int, in_f: int) -> int:
    """Copies of W plus H, its Cholesky factor and inverse."""
    return 4 * out_f * in_f * FLOAT_BYTES + 5 * in_f * in_f * FLOAT_BYTES


def hessian_bytes(in_f: int) -> int:
    """The float64 accumulator and its float32 copy."""
    return in_f * in_f * (8 + 4)


METHOD = Method(name="gptq", summary="default; Hessian-aware rounding from calibration data", quantize=quantize,
                quantize_ggml=quantize_ggml, quantize_shared=quantize_shared, needs_calibration=True,
                needs_hessian=True, options="gptq", work_bytes=work_bytes, hessian_bytes=hessian_bytes)
