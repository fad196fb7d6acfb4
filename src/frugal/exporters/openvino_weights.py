"""OpenVINO constants for frugal's tensors: float parameters in the narrowest float type that holds
them exactly, and quantized weights as OpenVINO's compressed-weight pattern

    codes (u2/u4/u8, i4/i8) -> Convert(f32) [-> Subtract(Convert(zero point))] -> Multiply(scale)
      [-> Reshape (out, in) for groups]

which the CPU plugin fuses into a FullyConnected reading the integer codes (measured on 2026.4:
its runtime model lists FullyConnected with u2/u4/u8/i4/i8 weights). The arithmetic is float32, so
(code - zero) * scale is frugal's in-memory weight bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from frugal.errors import FrugalError
from frugal.exporters.onnx import pack_low_first
from frugal.quant.grid import QuantizedWeight

# bits -> (container for symmetric grids (no zero point), container for grids with zero points).
# OpenVINO's CPU plugin has no i2 or u3 kernel: symmetric 2-bit codes are unsigned u2 with the zero point
# 2 (one scalar), and 3-bit codes sit in 4-bit containers (exact, but 4 bits per weight).
CONTAINERS = {2: ("u2", "u2"), 3: ("i4", "u4"), 4: ("i4", "u4"), 8: ("i8", "u8")}
CONTAINER_BITS = {"u2": 2, "u4": 4, "i4": 4, "u8": 8, "i8": 8}


FLOAT_TYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}


def exact_float_type(t: torch.Tensor) -> str:
    """A 16-bit tensor's own type; for float32 values the first of f16, bf16 that holds every value
    exactly (frugal's storage dtype rounds what stays unquantized to bf16 values), else f32."""
    if t.dtype in FLOAT_TYPES:
        return FLOAT_TYPES[t.dtype]
    x = t.detach().float()
    for dtype, name in FLOAT_TYPES.items():
        if torch.equal(x.to(dtype).float(), x):
            return name
    return "f32"


def float_constant(t: torch.Tensor, name: str) -> Any:
    """`t` as an f32 value: a Constant in its exact narrowest type, with a Convert to f32 when 16-bit."""
    import openvino as ov
    import openvino.opset13 as ops

    kind = exact_float_type(t)
    x = t.detach().float()
    if kind == "f32":
        return ops.constant(np.ascontiguousarray(x.numpy()), name=name)
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    tensor = ov.Tensor(getattr(ov.Type, kind), list(x.shape))
    bits = x.to(dtype).contiguous().view(torch.int16).numpy()  # the 16-bit patterns, unchanged
    tensor.data.reshape(-1).view(np.int16)[:] = bits.reshape(-1)
    return ops.convert(ops.constant(tensor, name=name), ov.Type.f32)


def integer_constant(values: np.ndarray, kind: str, name: str) -> Any:
    """A u2/u4/u8/i4/i8 Constant of `values` (integers already in the container's range); sub-byte types
    are packed as OpenVINO stores them, first element in the lowest bits, row-major over the whole tensor."""
    import openvino as ov
    import openvino.opset13 as ops

    bits = CONTAINER_BITS[kind]
    flat = values.reshape(-1).astype(np.int16)
    raw = (flat & ((1 << bits) - 1)).astype(np.uint8)  # two's complement fields for i4/i8
    if bits < 8:
        raw = pack_low_first(np.pad(raw, (0, -raw.size % (8 // bits))), bits)
    tensor = ov.Tensor(getattr(ov.Type, kind), list(values.shape))
    tensor.data.reshape(-1).view(np.uint8)[:] = raw
    return ops.constant(tensor, name=name)


def container_of(qw: QuantizedWeight) -> str:
    """The OpenVINO element type that holds the codes of `qw` (one FrugalError line if none does)."""
    if qw.bits not in CONTAINERS:
        raise FrugalError(f"--format openvino: {qw.bits}-bit codes are not supported "
                          f"(supported: {', '.join(map(str, CONTAINERS))} bits)")
    symmetric, asymmetric = CONTAINERS[qw.bits]
    return symmetric if qw.zero_point is None else asymmetric


def weight_tensors(qw: QuantizedWeight) -> dict[str, Any]:
    """Codes, zero point (None when the grid has none) and scale of `qw` in OpenVINO's layout:
    codes (out, n_groups, group) and scale/zero point (out, n_groups, 1) for groups, (out, in) and
    (out, 1) per channel. Unsigned containers hold u = q + 2^(b-1) and z_u = z + 2^(b-1)."""
    n, k = qw.q.shape
    groups = qw.scale.shape[1]
    kind = container_of(qw)
    shape, side = ((n, groups, k // groups), (n, groups, 1)) if groups > 1 else ((n, k), (n, 1))
    q = qw.q.to(torch.int16).numpy()
    zero = None
    if kind.startswith("u"):
        offset = 1 << (qw.bits - 1)
        q = q + offset
        zero = np.array(offset) if qw.zero_point is None else qw.zero_point.to(torch.int16).numpy() + offset
        zero = zero.reshape(side) if zero.ndim else zero  # symmetric u2: one scalar zero point
    return {"kind": kind, "codes": q.reshape(shape), "zero": zero, "scale": qw.scale.reshape(side)}


def compressed_weight(qw: QuantizedWeight, name: str) -> Any:
    """The (out, in) f32 weight of `qw` as OpenVINO's compressed-weight subgraph."""
    import openvino as ov
    import openvino.opset13 as ops

    t = weight_tensors(qw)
    w = ops.convert(integer_constant(t["codes"], t["kind"], f"{name}.weight"), ov.Type.f32)
    if t["zero"] is not None:
        zero = integer_constant(t["zero"], t["kind"], f"{name}.zero_point")
        w = ops.subtract(w, ops.convert(zero, ov.Type.f32))
    w = ops.multiply(w, float_constant(t["scale"], f"{name}.scale"))  # (out, n_groups, group) or (out, in)
    if w.get_output_partial_shape(0).rank.get_length() == 3:
        w = ops.reshape(w, ops.constant(np.array(qw.q.shape, dtype=np.int64)), special_zero=False)
    return w
