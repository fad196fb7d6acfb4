"""frugal.quant.sizes: the one count of a quantized weight's stored bytes."""

from __future__ import annotations

import pytest

from frugal.quant.sizes import float_format_bytes, ggml_bytes, packed_bytes, scale_bytes

SHAPES = [(64, 64), (128, 64), (576, 1536), (3, 100), (17, 96)]


def _checkpoint_before(out, inp, bits, group_size, symmetric, sb):
    """compressed-tensors bytes as frugal.compression.preflight counted them before sizes.py."""
    groups = 1 if group_size == -1 else -(-inp // group_size)
    n = out * -(-inp * bits // 32) * 4 + out * groups * sb + 16
    return n if symmetric else n + -(-out * bits // 32) * groups * 4


def _dense_before(out, inp, bits, group_size, symmetric):
    """fp16-scale bit count as frugal.analysis.analyze.Candidate.nbytes counted it before sizes.py."""
    groups = 1 if group_size == -1 else inp // group_size
    return (out * inp * bits + out * groups * (16 + (0 if symmetric else bits)) + 7) // 8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_same_numbers_as_the_counts_it_replaces(shape, bits, group_size, symmetric):
    out, inp = shape
    for sb in (2, 4):
        assert packed_bytes(out, inp, bits, group_size, symmetric, sb) == _checkpoint_before(out, inp, bits, group_size,
                                                                                           symmetric, sb)
    if group_size == -1 or inp % group_size == 0:  # analysis measures only candidates whose groups fit
        assert packed_bytes(out, inp, bits, group_size, symmetric, 2, layout="dense") == _dense_before(
            out, inp, bits, group_size, symmetric)


def test_checkpoint_layout_is_what_compressed_tensors_packs():
    """int32 words along rows (codes) and along the output dimension (zero points), weight_shape."""
    # 4-bit, 64 inputs: 8 words per row; 2 groups of 32; fp16 scales; 16 bytes of weight_shape
    assert packed_bytes(10, 64, 4, 32, True, 2) == 10 * 8 * 4 + 10 * 2 * 2 + 16
    # asymmetric: zero points of 10 rows x 4 bits = 40 bits -> 2 words per group
    assert packed_bytes(10, 64, 4, 32, False, 2) == 10 * 8 * 4 + 10 * 2 * 2 + 16 + 2 * 2 * 4
    with pytest.raises(ValueError):
        packed_bytes(10, 64, 4, 32, True, 2, layout="gguf")


def test_scale_bytes():
    assert scale_bytes("float16") == scale_bytes("bfloat16") == 2 and scale_bytes("float32") == 4
    assert scale_bytes("model") == 4 and scale_bytes("model", 2) == 2


def test_float_and_ggml_formats():
    from frugal.quant.floats import bits_per_weight
    from frugal.quant.ggml import TYPES

    assert float_format_bytes("mxfp4", 64, 576) == int(round(64 * 576 * bits_per_weight("mxfp4", 576) / 8))
    assert float_format_bytes("fp16", 3, 5) == 30
    name = next(iter(TYPES))
    t = TYPES[name]
    assert ggml_bytes(name, 4, 2 * t.block) == 4 * 2 * t.nbytes


def test_compressed_checkpoint_size_matches_the_estimate(tiny_model_factory, tmp_path):
    """The shared count, summed over a real compressed-tensors checkpoint's quantized weights, is the
    bytes of their tensors in the file (the JSON header aside)."""
    import math

    from safetensors import safe_open

    import frugal

    src = tiny_model_factory("llama")
    out = frugal.compress(src, {"method": "rtn", "weights": {"bits": 4, "group_size": 32, "scale_dtype": "float16"},
                                }).save(tmp_path / "q")
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            bases = [k[: -len("weight_shape")] for k in keys if k.endswith(".weight_shape")]
            assert bases
            for b in bases:
                o, i = st.get_tensor(b + "weight_shape").tolist()
                stored = sum(math.prod(st.get_slice(b + p).get_shape()) * st.get_tensor(b + p).element_size()
                             for p in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                             if b + p in keys)
                assert stored == packed_bytes(o, i, 4, 32, True, 2), b


@pytest.mark.parametrize("scheme", [(4, 32, True), (4, 32, False), (3, -1, False)], ids=["g32s", "g32a", "chan-a"])
def test_memory_layout_is_what_a_quantized_weight_holds(scheme):
    """layout "memory" (pre-flight's count of the codes held until saving) equals a real QuantizedWeight's
    int8 codes, float16 scales and int8 zero points."""
    import torch

    from frugal.quant.options import WeightScheme
    from frugal.quant.rtn import rtn_quantize

    bits, group_size, symmetric = scheme
    qw = rtn_quantize(torch.randn(48, 96), WeightScheme(bits, group_size, symmetric), scale_dtype=torch.float16)
    held = sum(t.numel() * t.element_size() for t in (qw.q, qw.scale, qw.zero_point) if t is not None)
    assert packed_bytes(48, 96, bits, group_size, symmetric, 2, layout="memory") == held
