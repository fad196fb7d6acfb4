"""Low-precision floating-point weight formats, simulated bit for bit.

`encode(w, fmt)` returns what a checkpoint stores (element values, block or channel scales, and
NVFP4's global scale), `decode` rebuilds the (out, in) float32 weight the way the stored format
defines it, and `fake_quantize = decode(encode(...))`. Every element value is exactly representable
in its element type and every scale in its scale type (both held as float32 here).

    format        element      block  scale                         reconstruction
    fp16 / bf16   the dtype    -      none                          cast (round to nearest even)
    fp8_e4m3      E4M3FN       row    float32 s = amax_row / 448    q * s
    fp8_e5m2      E5M2         row    float32 s = amax_row / 57344  q * s
    mxfp4         E2M1         32     E8M0 2^(floor(log2 amax) - 2) q * 2^e
    mxfp8_e4m3    E4M3FN       32     E8M0 2^(floor(log2 amax) - 8) q * 2^e
    nvfp4         E2M1         16     E4M3 s8, float32 global gs    q * (s8 / gs)

Formulas and where they come from are in each encoder's docstring. Weights are converted to float32
first; bit-exactness against compressed-tensors is for float32 weights (frugal loads in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugal.errors import FrugalError

# Magnitudes of the E2M1 codes 0..7 (the sign is bit 3). The last code bit is the mantissa bit, so
# "ties to even" means "ties to the even code index".
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E5M2_MAX = 57344.0  # torch.finfo(torch.float8_e5m2).max
E8M0_EXP_MIN, E8M0_EXP_MAX = -127, 127  # 0xFF is NaN
NVFP4_EPS_SCALE = 0.125  # compressed-tensors' replacement for an all-zero FP8 block scale


@dataclass(frozen=True)
class FloatFormat:
    """One row of the format table."""

    name: str
    element_bits: int
    block_size: int | None  # consecutive inputs sharing one scale; None: one scale per output row
    scale: str  # storage type of the block/row scale
    scale_bits: int  # bits of one block/row scale (0: no scale)
    description: str


FLOAT_FORMATS: dict[str, FloatFormat] = {f.name: f for f in (
    FloatFormat("fp16", 16, None, "none", 0, "IEEE half, round to nearest even (overflow gives inf)"),
    FloatFormat("bf16", 16, None, "none", 0, "bfloat16, round to nearest even"),
    FloatFormat("fp8_e4m3", 8, None, "float32", 32,
                "E4M3FN elements, per-output-channel float32 scale amax/448 (llm-compressor FP8 weights)"),
    FloatFormat("fp8_e5m2", 8, None, "float32", 32, "E5M2 elements, per-output-channel float32 scale amax/57344"),
    FloatFormat("mxfp4", 4, 32, "E8M0", 8, "OCP MX v1.0: E2M1 elements, power-of-two scale per 32 inputs"),
    FloatFormat("mxfp8_e4m3", 8, 32, "E8M0", 8, "OCP MX v1.0: E4M3 elements, power-of-two scale per 32 inputs"),
    FloatFormat("nvfp4", 4, 16, "E4M3 (+ float32 per tensor)", 8,
                "NVIDIA NVFP4: E2M1 elements, E4M3 scale per 16 inputs, float32 global scale"),
)}


@dataclass
class Encoded:
    """A weight as a checkpoint stores it, every number held as float32."""

    elements: torch.Tensor  # (out, in) values of the element type
    scales: torch.Tensor | None  # (out, in // block) or (out, 1) values of the scale type; None for fp16/bf16
    global_scale: torch.Tensor | None  # (1,) nvfp4 only: the block scale is scales / global_scale
    fmt: str


def get_format(fmt: str) -> FloatFormat:
    if fmt not in FLOAT_FORMATS:
        raise FrugalError(f"float format {fmt!r}: supported formats are {', '.join(FLOAT_FORMATS)}")
    return FLOAT_FORMATS[fmt]


def bits_per_weight(fmt: str, in_features: int) -> float:
    """Stored bits per weight, scales included: element_bits + scale_bits / (weights per scale).

    NVFP4's one float32 global scale per tensor (32 / (out * in) bits per weight) is left out.
    """
    f = get_format(fmt)
    _check_width(f, in_features)
    return f.element_bits + f.scale_bits / (f.block_size or in_features)


def fake_quantize(w: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(out, in) weight -> (out, in) float32 weight exactly as it is rebuilt from the stored format.

    `global_scale` (nvfp4 only) overrides the tensor's own, e.g. the one q/k/v or gate/up must share
    for vLLM (llm-compressor gives fused layers the minimum of their global scales).
    """
    return decode(encode(w, fmt, global_scale))


def encode(w: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None) -> Encoded:
    f = get_format(fmt)
    if w.ndim != 2:
        raise FrugalError(f"{fmt}: expected an (out, in) weight, got shape {tuple(w.shape)}")
    _check_width(f, w.shape[1])
    if global_scale is not None and fmt != "nvfp4":
        raise FrugalError(f"{fmt}: only nvfp4 has a global scale")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise FrugalError(f"{fmt}: the weight holds NaN or Inf")
    if fmt in ("fp16", "bf16"):
        dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        return Encoded(w.to(dtype).float(), None, None, fmt)
    if fmt == "fp8_e4m3":
        return _encode_fp8_channel(w, torch.float8_e4m3fn, E4M3_MAX, fmt)
    if fmt == "fp8_e5m2":
        return _encode_fp8_channel(w, torch.float8_e5m2, E5M2_MAX, fmt)
    if fmt == "mxfp4":
        return _encode_mx(w, round_e2m1, elem_emax=2, fmt=fmt)
    if fmt == "mxfp8_e4m3":
        return _encode_mx(w, round_e4m3, elem_emax=8, fmt=fmt)
    return _encode_nvfp4(w, global_scale)


def decode(enc: Encoded) -> torch.Tensor:
    """(out, in) float32: elements * scale, with nvfp4's scale s8 / gs formed first (as compressed-tensors)."""
    if enc.scales is None:
        return enc.elements
    scale = enc.scales if enc.global_scale is None else enc.scales / enc.global_scale  # (out, n_blocks)
    out, n_blocks = scale.shape
    q = enc.elements.view(out, n_blocks, -1)  # (out, n_blocks, block)
    return (q * scale[..., None]).view(enc.elements.shape)


# ---------------------------------------------------------------------------------------------
# Element rounding


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value of each (finite) x, ties to the even code, saturating at +-6.

    Between neighbours lo < hi of E2M1_VALUES the midpoint (lo + hi) / 2 is exact in float32, so the
    comparison is exact: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    """
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)  # (8,)
    a = x.float().abs().clamp(max=E2M1_MAX)  # (...)
    hi = torch.searchsorted(grid, a.contiguous()).clamp(1, 7)  # (...) first index with grid >= a
    lo = hi - 1
    mid = (grid[lo] + grid[hi]) / 2
    take_hi = (a > mid) | ((a == mid) & (hi % 2 == 0))
    return torch.copysign(torch.where(take_hi, grid[hi], grid[lo]), x.float())


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP8 E4M3FN value (torch's cast: round to nearest even), saturating at +-448."""
    return _cast_saturating(x, torch.float8_e4m3fn, E4M3_MAX)


def _cast_saturating(x: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    # torch 2.13 on CPU saturates float8_e4m3fn casts but sends float8_e5m2 overflow to inf: clamp
    # first so both saturate, as compressed-tensors does before its FP8 cast.
    return x.float().clamp(-fmax, fmax).to(dtype).float()


# ---------------------------------------------------------------------------------------------
# Encoders


def _encode_fp8_channel(w: torch.Tensor, dtype: torch.dtype, fmax: float, fmt: str) -> Encoded:
    """Per-output-channel FP8, compressed-tensors 0.20 `calculate_qparams` + `fake_quantize` (CHANNEL):

        s = amax_row / fmax            (float32; s == 0 -> float32 eps, as compressed-tensors)
        q = fp8(clamp(w / s, -fmax, fmax))
        w_hat = q * s
    compressed-tensors only has E4M3 for 8-bit floats; E5M2 follows the same recipe.
    """
    amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    s = amax / fmax
    s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
    q = _cast_saturating(w / s, dtype, fmax)  # (out, in)
    return Encoded(q, s, None, fmt)


def e8m0_exponent(amax: torch.Tensor, elem_emax: int) -> torch.Tensor:
    """OCP MX v1.0 shared exponent floor(log2 amax) - elem_emax, clamped to E8M0's [-127, 127].

    floor(log2 amax) is read from the float32 exponent (frexp: amax = m * 2^E, m in [0.5, 1)), so it
    is exact where log2 would round up just below a power of two. amax == 0 gives -127.
    """
    _, exp = torch.frexp(amax.float())  # (...) int32
    e = torch.where(amax > 0, exp - 1 - elem_emax, E8M0_EXP_MIN)
    return e.clamp(E8M0_EXP_MIN, E8M0_EXP_MAX)


def _encode_mx(w: torch.Tensor, round_elem, elem_emax: int, fmt: str) -> Encoded:
    """OCP Microscaling v1.0 (section 6.3), blocks of 32 consecutive inputs:

        X = 2^(floor(log2 amax_block) - elem_emax)   (E8M0; elem_emax = 2 for E2M1, 8 for E4M3)
        q = round_elem(w / X)                        (nearest even, saturating at the element max)
        w_hat = q * X
    With the floor, amax / X lies in [4, 8) for E2M1, so a block maximum above 6 X saturates to 6 X.
    compressed-tensors 0.20 and vLLM's reference_mxfp4.py choose X differently (amax is first rounded
    to a power of two, upward when its mantissa is >= 1.75): their X is 2x ours on those blocks.
    """
    out, n = w.shape
    blocks = w.view(out, n // 32, 32)  # (out, n_blocks, 32)
    e = e8m0_exponent(blocks.abs().amax(dim=-1), elem_emax)  # (out, n_blocks)
    x = torch.pow(2.0, e.double()).float()  # exact powers of two, 2^-127 included (subnormal)
    q = round_elem(blocks / x[..., None])  # (out, n_blocks, 32)
    return Encoded(q.view(out, n), x, None, fmt)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """(1,) float32 gs = 448 * 6 / amax_tensor, compressed-tensors 0.20 `generate_gparam`.

    amax is clamped to float32's smallest normal first; a non-finite result becomes 1.
    """
    amax = w.float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    gs = (E4M3_MAX * E2M1_MAX) / amax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def _encode_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None) -> Encoded:
    """NVFP4 as llm-compressor / compressed-tensors 0.20 produce it (scheme NVFP4A16, TENSOR_GROUP):

        gs  = 2688 / amax_tensor                          (float32, `generate_gparam`)
        s8  = e4m3(clamp(gs * (amax_block / 6), +-448))   (`calculate_qparams`; s8 == 0 -> 0.125)
        q   = e2m1(clamp(w / (s8 / gs), -6, 6))           (`_quantize_dequantize`, `cast_to_fp4`)
        w_hat = q * (s8 / gs)
    The checkpoint stores q (packed nibbles), s8 (float8_e4m3fn) and gs (`weight_global_scale`).
    Engines fold 1/gs into the GEMM output instead; compressed-tensors' decompressor rounds w_hat
    to bfloat16 by default.
    """
    gs = nvfp4_global_scale(w) if global_scale is None else global_scale.float().reshape(1)
    out, n = w.shape
    blocks = w.view(out, n // 16, 16)  # (out, n_blocks, 16)
    local = blocks.abs().amax(dim=-1) / E2M1_MAX  # (out, n_blocks)
    s8 = (gs * local).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    s8 = torch.where(s8 == 0, NVFP4_EPS_SCALE, s8)
    eff = s8 / gs  # (out, n_blocks)
    q = round_e2m1((blocks / eff[..., None]).clamp(-E2M1_MAX, E2M1_MAX))  # (out, n_blocks, 16)
    return Encoded(q.view(out, n), s8, gs, "nvfp4")


def _check_width(f: FloatFormat, in_features: int) -> None:
    if in_features <= 0 or (f.block_size and in_features % f.block_size):
        raise FrugalError(f"{f.name} needs rows whose length is a multiple of {f.block_size or 1}; "
                          f"this weight has {in_features}")
