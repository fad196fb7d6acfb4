"""Low-precision float formats: known answers, representability, compressed-tensors and brute-force
references, error bounds and ordering, zeros / tiny blocks / outliers."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4, unpack_fp4_from_uint8
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC, MXFP4A16, NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

from frugal.errors import FrugalError
from frugal.quant.floats import (
    E2M1_VALUES,
    FLOAT_FORMATS,
    bits_per_weight,
    decode,
    e8m0_exponent,
    encode,
    fake_quantize,
    round_e2m1,
    round_e4m3,
)

FORMATS = tuple(FLOAT_FORMATS)
E2M1_SET = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES[1:]))
FP8_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "mxfp8_e4m3": torch.float8_e4m3fn}
# Relative error ||W_hat - W|| / ||W|| of 128x512 standard-normal weights, (low, high). Measured on
# seeds 0-3: fp16 2.1e-4, bf16 1.66e-3, fp8_e4m3 0.0261-0.0264, fp8_e5m2 0.0521-0.0524,
# mxfp4 0.1147-0.1155, mxfp8_e4m3 0.0294-0.0295, nvfp4 0.0948-0.0955.
REL_ERROR = {
    "fp16": (1.5e-4, 3e-4), "bf16": (1.2e-3, 2.2e-3), "fp8_e4m3": (0.022, 0.03), "fp8_e5m2": (0.045, 0.06),
    "mxfp4": (0.10, 0.13), "mxfp8_e4m3": (0.025, 0.034), "nvfp4": (0.085, 0.105),
}


def gaussian(seed: int = 0, out: int = 64, inp: int = 256, std: float = 1.0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * std


def nearest_by_enumeration(x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Brute-force reference: for each x (N,) the value (K,) at least distance, ties to the even code
    (the code's last bit is the mantissa's), out-of-range x to the largest finite value."""
    d = (x.double()[:, None] - values.double()[None, :]).abs()  # (N, K), exact in float64
    best = d == d.min(dim=1, keepdim=True).values  # (N, K) every nearest value
    even = best & (codes % 2 == 0)[None, :]
    pick = torch.where(even.any(dim=1), even.int().argmax(dim=1), best.int().argmax(dim=1))
    return values[pick].float()


def all_fp8(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite value of an fp8 dtype with its 8-bit code."""
    codes = torch.arange(256, dtype=torch.int32)
    values = codes.to(torch.uint8).view(dtype).float()
    keep = torch.isfinite(values)
    return codes[keep], values[keep]


def all_e2m1() -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.arange(16)
    values = torch.tensor([(-1.0 if c >= 8 else 1.0) * E2M1_VALUES[c % 8] for c in range(16)])
    return codes, values


# --- 1. Known answers ------------------------------------------------------------------------


def test_e2m1_ties_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 0.26, 0.74, 2.51, 5.01, 100.0, 0.1, 6.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.5, 0.5, 3.0, 6.0, 6.0, 0.0, 6.0])
    assert torch.equal(round_e2m1(x), want)
    assert torch.equal(round_e2m1(-x), -want)


def test_e2m1_matches_enumeration_and_compressed_tensors():
    # every multiple of 1/64 in [-8, 8] (all ties included) plus random values
    x = torch.cat([torch.arange(-512, 513) / 64, gaussian(1, 1, 4096).flatten() * 3])
    ours = round_e2m1(x)
    assert torch.equal(ours, nearest_by_enumeration(x, *all_e2m1()))
    assert torch.equal(ours, cast_to_fp4(x.clone().clamp(-6, 6)))


def test_fp16_bf16_round_half_to_even():
    one = 1.0
    bf = torch.tensor([[one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20]])  # ties, and just above a tie
    assert fake_quantize(bf, "bf16").tolist() == [[1.0, one + 2**-6, one + 2**-7]]
    fp = torch.tensor([[one + 2**-11, one + 3 * 2**-11, 65504.0]])
    assert fake_quantize(fp, "fp16").tolist() == [[1.0, one + 2**-9, 65504.0]]


def test_mxfp4_block_by_hand():
    # block 0: amax 0.7 -> floor(log2 0.7) = -1 -> X = 2^(-1-2) = 0.125; w / X and its E2M1 value:
    #   0.7 -> 5.6 -> 6 | 0.3125 -> 2.5 -> 2 | 0.21875 -> 1.75 -> 2 | -0.4375 -> -3.5 -> -4
    #   0.03125 -> 0.25 -> 0 | 0.09375 -> 0.75 -> 1 | 0.625 -> 5 -> 4
    # block 1: amax 7 -> X = 2^(2-2) = 1 -> 7 saturates to 6; 3 stays 3, -1.25 -> -1
    w = torch.zeros(1, 64)
    w[0, :7] = torch.tensor([0.7, 0.3125, 0.21875, -0.4375, 0.03125, 0.09375, 0.625])
    w[0, 32:35] = torch.tensor([7.0, 3.0, -1.25])
    enc = encode(w, "mxfp4")
    assert enc.scales.tolist() == [[0.125, 1.0]]
    want = torch.zeros(1, 64)
    want[0, :7] = torch.tensor([6.0, 2.0, 2.0, -4.0, 0.0, 1.0, 4.0]) * 0.125
    want[0, 32:35] = torch.tensor([6.0, 3.0, -1.0])
    assert torch.equal(fake_quantize(w, "mxfp4"), want)


def test_e8m0_exponent_is_exact_floor_and_clamped():
    below = torch.nextafter(torch.tensor(2.0**-8), torch.tensor(0.0))  # float32 2^-8 (1 - 2^-24)
    assert torch.log2(below).item() == -8.0  # float32 log2 rounds up; the floor is -9
    amax = torch.tensor([below.item(), 2.0**-8, 1e-30, 1e-40, 0.0, 3e38])
    want = [-9 - 2, -8 - 2, -100 - 2, -127, -127, 127 - 2]
    assert e8m0_exponent(amax, 2).tolist() == want


def test_fp8_e4m3_saturates_at_448():
    x = torch.tensor([448.0, 463.9, 464.0, 500.0, 1e6, -1e6, 1e-9])
    assert round_e4m3(x).tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0, 0.0]
    # per channel the row maximum maps onto 448 exactly: s = amax / 448
    w = torch.tensor([[896.0] + [1.0] * 15])
    enc = encode(w, "fp8_e4m3")
    assert enc.scales.item() == 2.0 and enc.elements[0, 0].item() == 448.0
    assert fake_quantize(w, "fp8_e4m3")[0, 0].item() == 896.0


def test_bits_per_weight():
    assert bits_per_weight("fp16", 576) == 16 and bits_per_weight("bf16", 576) == 16
    assert bits_per_weight("fp8_e4m3", 576) == 8 + 32 / 576
    assert bits_per_weight("mxfp4", 576) == 4.25
    assert bits_per_weight("mxfp8_e4m3", 576) == 8.25
    assert bits_per_weight("nvfp4", 576) == 4.5


def test_refuses_bad_input():
    with pytest.raises(FrugalError, match="supported formats"):
        fake_quantize(torch.zeros(2, 32), "fp6")
    with pytest.raises(FrugalError, match="multiple of 32"):
        fake_quantize(torch.zeros(2, 48), "mxfp4")
    with pytest.raises(FrugalError, match="multiple of 16"):
        bits_per_weight("nvfp4", 40)
    with pytest.raises(FrugalError, match="NaN or Inf"):
        fake_quantize(torch.full((2, 16), float("nan")), "nvfp4")


# --- 2. Every output value is representable --------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_are_representable(fmt):
    w = gaussian(2, std=0.02)
    enc = encode(w, fmt)
    out = fake_quantize(w, fmt)
    assert torch.equal(out, decode(enc))
    if fmt in ("fp16", "bf16"):
        dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        assert torch.equal(out.to(dtype).float(), out)
        return
    if fmt in FP8_DTYPE:  # elements survive a round trip through the torch float8 dtype
        assert torch.equal(enc.elements.to(FP8_DTYPE[fmt]).float(), enc.elements)
    else:
        assert torch.isin(enc.elements, E2M1_SET).all()
    block = FLOAT_FORMATS[fmt].block_size or w.shape[1]
    s = enc.scales.repeat_interleave(block, dim=1)  # (out, in)
    if fmt.startswith("mx"):  # E8M0: powers of two in range, so output / X is the element exactly
        mant, exp = torch.frexp(enc.scales)
        assert (mant == 0.5).all() and (exp - 1).min() >= -127 and (exp - 1).max() <= 127
        assert torch.equal(out / s, enc.elements)
    elif fmt == "nvfp4":  # E4M3 block scales, one float32 global scale; w_hat = q * (s8 / gs)
        assert torch.equal(enc.scales.to(torch.float8_e4m3fn).float(), enc.scales) and (enc.scales > 0).all()
        assert enc.global_scale.shape == (1,)
        assert torch.equal(out, enc.elements * (s / enc.global_scale))
    else:  # per-channel float32 scale
        assert enc.scales.shape == (w.shape[0], 1)
        assert torch.equal(out, enc.elements * s)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "fp16", "bf16"])
def test_idempotent(fmt):
    """A block maximum lands on q >= 4 (E2M1) or q >= 256 (E4M3), so re-encoding finds the same X."""
    once = fake_quantize(gaussian(3), fmt)
    assert torch.equal(fake_quantize(once, fmt), once)


# --- 3. Independent implementations ----------------------------------------------------------


def test_nvfp4_matches_compressed_tensors_bit_for_bit():
    w = torch.cat([gaussian(4, 32, 256, 0.02), gaussian(5, 32, 256, 0.02) * torch.rand(32, 1) * 5])
    w[0, :16] = 0.0  # a zero block and a tiny one: their FP8 scale underflows to 0, stored as 0.125
    w[1, 16:32] *= 1e-6
    args = NVFP4A16["weights"]
    gs = generate_gparam(w.amin(), w.amax())  # llm-compressor's min-max observer, whole tensor
    blocks = w.view(64, 16, 16)
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
    ref = ct_fake_quantize(w, scale, zp, args, global_scale=gs)
    enc = encode(w, "nvfp4")
    assert torch.equal(enc.global_scale, gs) and torch.equal(enc.scales, scale)
    assert torch.equal(decode(enc), ref)
    # the codes compressed-tensors' NVFP4 compressor packs into the checkpoint are our elements
    packed = quantize_and_pack_fp4(w, scale, global_scale=gs, group_size=16)
    assert torch.equal(unpack_fp4_from_uint8(packed, 64, 256, dtype=torch.float32), enc.elements)


def test_nvfp4_shared_global_scale():
    w = gaussian(6, std=0.02)
    gs = torch.tensor([1000.0])
    enc = encode(w, "nvfp4", global_scale=gs)
    assert enc.global_scale.item() == 1000.0
    args = NVFP4A16["weights"]
    blocks = w.view(64, 16, 16)
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
    assert torch.equal(decode(enc), ct_fake_quantize(w, scale, zp, args, global_scale=gs))
    with pytest.raises(FrugalError, match="only nvfp4"):
        encode(w, "mxfp4", global_scale=gs)


def test_fp8_e4m3_channel_matches_compressed_tensors():
    w = gaussian(7, std=0.02) * torch.rand(64, 1) * 10
    w[3] = 0.0  # an all-zero row: compressed-tensors' eps scale
    args = FP8_DYNAMIC["weights"]  # FP8 weights, CHANNEL strategy
    scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    ref = ct_fake_quantize(w, scale, zp, args)
    enc = encode(w, "fp8_e4m3")
    assert torch.equal(enc.scales, scale)
    assert torch.equal(decode(enc), ref)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3", "mxfp4", "nvfp4"])
def test_elements_match_enumeration(fmt):
    """Element rounding against a brute-force nearest value (compressed-tensors has no E5M2 and no
    OCP-floor MX scales to compare with)."""
    w = gaussian(8, 16, 256) * torch.logspace(-3, 3, 16)[:, None]
    enc = encode(w, fmt)
    block = FLOAT_FORMATS[fmt].block_size or w.shape[1]
    s = enc.scales if enc.global_scale is None else enc.scales / enc.global_scale
    scaled = (w.view(16, -1, block) / s[..., None]).flatten()  # what each element rounds
    table = all_fp8(FP8_DTYPE[fmt]) if fmt in FP8_DTYPE else all_e2m1()
    assert torch.equal(enc.elements.flatten(), nearest_by_enumeration(scaled, *table))


def test_mxfp4_versus_compressed_tensors_scale_choice():
    """compressed-tensors 0.20 (and vLLM's reference_mxfp4.py) round the block maximum to a power of
    two upward when its mantissa is >= 1.75 before taking floor(log2); OCP v1.0 takes the floor.
    Elements and output agree wherever the scales agree, and the scales differ (by exactly 2x) on
    just those blocks."""
    w = gaussian(9, std=0.02)
    blocks = w.view(64, 8, 32)
    amax = blocks.abs().amax(-1)
    args = MXFP4A16["weights"]
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    ref = ct_fake_quantize(w, scale, zp, args)
    enc = encode(w, "mxfp4")
    mantissa, _ = torch.frexp(amax)  # amax = mantissa * 2^E, mantissa in [0.5, 1)
    differ = mantissa >= 0.875  # 1.75 / 2
    assert 0 < differ.sum() < differ.numel()
    assert torch.equal(scale != enc.scales, differ)
    assert torch.equal(scale[differ], 2 * enc.scales[differ])
    same = (~differ).repeat_interleave(32, dim=1)
    assert torch.equal(ref[same], decode(enc)[same])


# --- 4. Error bounds and ordering ------------------------------------------------------------


def test_relative_error_bounds_and_ordering():
    w = gaussian(10, 128, 512)
    err = {f: ((fake_quantize(w, f) - w).norm() / w.norm()).item() for f in FORMATS}
    for f, (lo, hi) in REL_ERROR.items():
        assert lo < err[f] < hi, (f, err[f])
    assert err["fp16"] < err["bf16"] < err["fp8_e4m3"] < err["nvfp4"] <= err["mxfp4"]
    assert err["fp8_e4m3"] < err["fp8_e5m2"]


# --- 5. Zeros, tiny blocks, outliers ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros_stay_zero(fmt):
    assert torch.equal(fake_quantize(torch.zeros(4, 64), fmt), torch.zeros(4, 64))
    w = gaussian(11, 4, 64)
    w[:, ::3] = 0.0
    w[1] = 0.0  # a whole zero row
    enc = encode(w, fmt)
    out = decode(enc)
    assert (out[:, ::3] == 0).all() and (out[1] == 0).all()
    assert enc.scales is None or (torch.isfinite(enc.scales).all() and (enc.scales > 0).all())


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_block_and_tiny_tensor(fmt):
    w = gaussian(12, 4, 64)
    w[2, :32] *= 1e-30  # one tiny block (and a row whose maximum is ordinary)
    out = fake_quantize(w, fmt)
    assert torch.isfinite(out).all()
    tiny, got = w[2, :32], out[2, :32]
    if fmt.startswith("mx") or fmt == "bf16":  # power-of-two scales reach 2^-127: kept, relatively
        assert ((got - tiny).double().norm() / tiny.double().norm()).item() < 0.2  # float32 squares underflow
    else:  # fp16 underflows; a row or tensor scale flushes the tiny block to zero
        assert (got == 0).all()
    small = fake_quantize(gaussian(13, 4, 64) * 1e-30, fmt)  # the whole tensor tiny
    assert torch.isfinite(small).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_huge_outlier(fmt):
    w = gaussian(14, 4, 64, std=0.02)
    big = w.clone()
    big[0, 5] = 1e4
    out = fake_quantize(big, fmt)
    assert torch.isfinite(out).all()
    assert abs(out[0, 5].item() - 1e4) / 1e4 <= 0.25
    if fmt.startswith("mx"):  # blocks are independent: only the outlier's block changes
        assert torch.equal(out[:, 32:], fake_quantize(w, fmt)[:, 32:])
        assert torch.equal(out[1:], fake_quantize(w, fmt)[1:])
    if fmt.startswith("fp8"):  # other rows keep their own scale
        assert torch.equal(out[1:], fake_quantize(w, fmt)[1:])
