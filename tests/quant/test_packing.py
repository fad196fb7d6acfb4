"""compressed-tensors `pack-quantized` export: known-answer packing, round trips, quantization_config."""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationScheme

from frugal.config import WeightScheme
from frugal.exporters.compressed_tensors import compressed_state_dict, quantization_config
from frugal.quant.grid import QuantizedWeight, qrange
from frugal.quant.rtn import rtn_quantize

BITS = (2, 3, 4, 8)
GROUPS = (-1, 32, 64, 128)
# A hand-chosen row of 32 codes: both ends of every grid, zero, -1 and an irregular middle.
ROW = [-2, 1, 0, -1, 1, -2, -1, 0, 0, 1, -2, 1, -1, -1, 0, -2,
       1, 1, 0, -2, -1, 0, 1, -2, 0, -1, 1, 1, -2, 0, -1, 1]


def signed32(u: int) -> int:
    """Unsigned 32-bit word as the int32 torch stores."""
    return u - (1 << 32) if u >= 1 << 31 else u


def reference_words(codes: list[int], bits: int) -> list[int]:
    """Dense little-endian packing: code + 2^(bits-1) at bits [i*bits, (i+1)*bits), 32 bits a word."""
    stream = 0
    for i, c in enumerate(codes):
        u = c + (1 << (bits - 1))
        assert 0 <= u < 1 << bits
        stream |= u << (i * bits)
    n_words = math.ceil(len(codes) * bits / 32)
    return [signed32((stream >> (32 * j)) & 0xFFFFFFFF) for j in range(n_words)]


def pack_row(codes: list[int], bits: int) -> list[int]:
    """What the exporter stores for a 1 x len(codes) weight."""
    qw = QuantizedWeight(q=torch.tensor([codes], dtype=torch.int8), scale=torch.ones(1, 1),
                         zero_point=None, bits=bits, group_size=-1)
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(len(codes), 1, bias=False)
    packed = compressed_state_dict(model, {"lin": qw})["lin.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (1, math.ceil(len(codes) * bits / 32))
    return packed[0].tolist()


def scaled_row(bits: int) -> list[int]:
    """ROW stretched onto the full code range of `bits` (ends stay ends)."""
    qmin, qmax = qrange(bits)
    lut = {-2: qmin, -1: -1, 0: 0, 1: qmax}
    return [lut[c] for c in ROW]


def test_pack_known_answer_literals():
    """Hand-computed words of patterned rows at 2, 3, 4 and 8 bits."""
    # 2 bits: unsigned 0,1,2,3 repeating -> byte 0b11100100
    assert pack_row([i % 4 - 2 for i in range(32)], 2) == [signed32(0xE4E4E4E4)] * 2
    # 3 bits: unsigned 0..7 repeating -> 24-bit chunk 0o76543210 = 0xFAC688, split across words
    assert pack_row([i % 8 - 4 for i in range(32)], 3) == [signed32(0x88FAC688), signed32(0xC688FAC6),
                                                           signed32(0xFAC688FA)]
    # 4 bits: unsigned nibbles 0..15 in order
    assert pack_row([i % 16 - 8 for i in range(32)], 4) == [0x76543210, signed32(0xFEDCBA98)] * 2
    # 8 bits: unsigned bytes 0, 8, 16, ..., 248
    expected = [signed32(sum((8 * (4 * j + k)) << (8 * k) for k in range(4))) for j in range(8)]
    assert expected[:2] == [0x18100800, 0x38302820]
    assert pack_row([8 * i - 128 for i in range(32)], 8) == expected


@pytest.mark.parametrize("bits", BITS)
def test_pack_known_answer_hand_row(bits):
    """An irregular hand-chosen row packs to the bit-stream reference at every width."""
    codes = scaled_row(bits)
    assert pack_row(codes, bits) == reference_words(codes, bits)


@pytest.mark.parametrize("bits", BITS)
def test_pack_partial_last_word(bits):
    """A row that does not fill its last word (in = 40) pads with zero bits."""
    codes = (scaled_row(bits) + scaled_row(bits))[:40]
    assert pack_row(codes, bits) == reference_words(codes, bits)


def tiny_model(out_f: int, in_f: int, seed: int) -> torch.nn.Module:
    """A module holding one seeded nn.Linear called `lin`."""
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(in_f, out_f)
    return model


def local_state(sd: dict[str, torch.Tensor], prefix: str = "lin.") -> dict[str, torch.Tensor]:
    """The per-module state dict compressed-tensors' compressor takes (prefix stripped, weight_* only)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix + "weight")}


def config_scheme(qw: QuantizedWeight) -> QuantizationScheme:
    """The QuantizationScheme that our quantization_config writes for a single layer."""
    cfg = quantization_config({"lin": qw}, ["lin"])
    return QuantizationScheme(**cfg["config_groups"]["group_0"])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_export_round_trip(bits, group_size, symmetric, scale_dtype):
    """Packed codes and zero points unpack exactly, and compressed-tensors decompresses to dequantize()."""
    out_f, in_f = 40, 256  # 40 rows: packed zero points end in a partial word at 3 bits
    model = tiny_model(out_f, in_f, seed=bits * 100 + max(group_size, 0))
    qw = rtn_quantize(model.lin.weight.detach(), WeightScheme(bits, group_size, symmetric), scale_dtype=scale_dtype)
    sd = compressed_state_dict(model, {"lin": qw})
    expected_keys = {"lin.bias", "lin.weight_packed", "lin.weight_scale", "lin.weight_shape"}
    assert set(sd) == expected_keys | (set() if symmetric else {"lin.weight_zero_point"})
    assert torch.equal(sd["lin.bias"], model.lin.bias)
    assert sd["lin.weight_shape"].tolist() == [out_f, in_f] and sd["lin.weight_shape"].dtype == torch.int64
    assert sd["lin.weight_packed"].shape == (out_f, in_f * bits // 32)
    assert sd["lin.weight_scale"].dtype == scale_dtype
    assert torch.equal(unpack_from_int32(sd["lin.weight_packed"], bits, torch.Size([out_f, in_f])), qw.q)
    n_groups = qw.scale.shape[1]
    if not symmetric:
        zp = sd["lin.weight_zero_point"]
        assert zp.dtype == torch.int32 and zp.shape == (math.ceil(out_f * bits / 32), n_groups)
        assert torch.equal(unpack_from_int32(zp, bits, torch.Size([out_f, n_groups]), packed_dim=0), qw.zero_point)
    weight = PackedQuantizationCompressor.decompress(local_state(sd), config_scheme(qw))["weight"]
    assert weight.dtype == scale_dtype
    assert torch.equal(weight, qw.dequantize(scale_dtype))


@pytest.mark.parametrize("bits", BITS)
def test_channel_round_trip_odd_width(bits):
    """Per-channel layers may have in_features that are not a multiple of 32 (here 80)."""
    model = tiny_model(24, 80, seed=bits)
    qw = rtn_quantize(model.lin.weight.detach(), WeightScheme(bits, -1, False), scale_dtype=torch.float32)
    sd = compressed_state_dict(model, {"lin": qw})
    assert sd["lin.weight_packed"].shape == (24, math.ceil(80 * bits / 32))
    weight = PackedQuantizationCompressor.decompress(local_state(sd), config_scheme(qw))["weight"]
    assert torch.equal(weight, qw.dequantize())


def test_pack_matches_library_on_random_codes():
    """The exporter's packing equals the bit-stream reference for random full-range rows."""
    g = torch.Generator().manual_seed(0)
    for bits in BITS:
        qmin, qmax = qrange(bits)
        codes = torch.randint(qmin, qmax + 1, (3, 64), generator=g, dtype=torch.int8)
        packed = pack_to_int32(codes, bits)
        assert [reference_words(r, bits) for r in codes.tolist()] == packed.tolist()


def test_unquantized_layers_are_untouched():
    """Layers absent from `quantized` keep their float weight in the state dict."""
    model = tiny_model(8, 64, seed=0)
    model.head = torch.nn.Linear(8, 4, bias=False)
    qw = rtn_quantize(model.lin.weight.detach(), WeightScheme(4, 32, True))
    sd = compressed_state_dict(model, {"lin": qw})
    assert "lin.weight" not in sd and torch.equal(sd["head.weight"], model.head.weight)


def weights_of(cfg: dict, group: str = "group_0") -> dict:
    """The `weights` args of one config group."""
    return cfg["config_groups"][group]["weights"]


def test_quantization_config_group_symmetric():
    """A single symmetric group scheme: one 'Linear' group, group strategy, no dequantize flag."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    qw = rtn_quantize(w, WeightScheme(4, 32, True))
    cfg = quantization_config({"a.q": qw, "a.k": qw}, ["a.q", "a.k", "lm_head", "a.gate"])
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["quantization_status"] == "compressed"
    assert list(cfg["config_groups"]) == ["group_0"]
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    args = weights_of(cfg)
    assert (args["num_bits"], args["type"], args["symmetric"]) == (4, "int", True)
    assert (args["strategy"], args["group_size"], args["dynamic"]) == ("group", 32, False)
    assert cfg["ignore"] == ["lm_head", "a.gate"]
    assert "dequantize" not in cfg


def test_quantization_config_channel_asymmetric():
    """A per-channel asymmetric scheme: channel strategy, no group size, dequantize-at-load set."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    qw = rtn_quantize(w, WeightScheme(3, -1, False))
    cfg = quantization_config({"x": qw}, ["x"])
    args = weights_of(cfg)
    assert (args["num_bits"], args["symmetric"], args["strategy"], args["group_size"]) == (3, False, "channel", None)
    assert cfg["ignore"] == []
    assert cfg["dequantize"] is True


def test_quantization_config_mixed_schemes():
    """Distinct schemes get one group each, targeted by anchored regexes of their layer names."""
    g = torch.Generator().manual_seed(3)
    sym = rtn_quantize(torch.randn(8, 64, generator=g), WeightScheme(4, 64, True))
    asym = rtn_quantize(torch.randn(8, 64, generator=g), WeightScheme(8, 32, False))
    cfg = quantization_config({"m.l0.q": sym, "m.l0.k": asym, "m.l1.q": sym}, ["m.l0.q", "m.l0.k", "m.l1.q"])
    groups = cfg["config_groups"]
    assert set(groups) == {"group_0", "group_1"}
    assert groups["group_0"]["targets"] == ["re:^m[.]l0[.]q$", "re:^m[.]l1[.]q$"]
    assert groups["group_1"]["targets"] == ["re:^m[.]l0[.]k$"]
    assert (weights_of(cfg, "group_0")["symmetric"], weights_of(cfg, "group_0")["group_size"]) == (True, 64)
    assert (weights_of(cfg, "group_1")["symmetric"], weights_of(cfg, "group_1")["num_bits"]) == (False, 8)
    assert cfg["dequantize"] is True
