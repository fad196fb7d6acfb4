"""Stored bytes of one quantized (out, in) weight: the single place that counts them.

Pure integer arithmetic on shapes and formats; no tensor is touched.
"""

from __future__ import annotations

SHAPE_BYTES = 16  # compressed-tensors' `weight_shape`: two int64


def scale_bytes(scale_dtype: str, model_bytes: int = 4) -> int:
    """Bytes of one scale of a WeightScheme.scale_dtype ("model": the weights' own, `model_bytes`)."""
    return {"float16": 2, "bfloat16": 2, "float32": 4}.get(scale_dtype, model_bytes)


def packed_bytes(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, scale_bytes: int,
                 layout: str = "checkpoint") -> int:
    """Bytes of an (out, in) integer-quantized weight with one scale (and zero point, when asymmetric)
    per `group_size` inputs of each row (-1: one per row).

    layout "checkpoint": as a compressed-tensors checkpoint stores it: codes packed into int32 along
    each row, scales of `scale_bytes` each, zero points packed into int32 along the output dimension,
    and the weight_shape tensor.
    layout "dense": every code, scale and zero point bit-packed back to back, rounded up to a byte once
    (the size model of frugal.analysis, kept for its cached analyses).
    layout "memory": a QuantizedWeight before packing: one int8 per code and zero point, the scales."""
    groups = 1 if group_size == -1 else -(-in_f // group_size)
    if layout == "dense":
        return (out_f * in_f * bits + out_f * groups * (8 * scale_bytes + (0 if symmetric else bits)) + 7) // 8
    if layout == "memory":
        return out_f * in_f + out_f * groups * (scale_bytes + (0 if symmetric else 1))
    if layout != "checkpoint":
        raise ValueError(f"layout {layout!r}: 'checkpoint', 'dense' or 'memory'")
    n = out_f * -(-in_f * bits // 32) * 4 + out_f * groups * scale_bytes + SHAPE_BYTES
    return n if symmetric else n + -(-out_f * bits // 32) * groups * 4


def float_format_bytes(fmt: str, out_f: int, in_f: int) -> int:
    """Bytes of an (out, in) weight in a float format of frugal.quant.floats, block scales included."""
    from frugal.quant.floats import bits_per_weight

    return int(round(out_f * in_f * bits_per_weight(fmt, in_f) / 8))


def ggml_bytes(type_name: str, out_f: int, in_f: int) -> int:
    """Bytes of an (out, in) weight in a GGML block type of frugal.quant.ggml."""
    from frugal.quant.ggml import TYPES

    t = TYPES[type_name]
    return out_f * in_f // t.block * t.nbytes
