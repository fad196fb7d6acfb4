"""`frugal export`: a compressed-tensors directory read back gives the very codes, scales and zero
points that were compressed, and re-exporting them to every format keeps them."""

from __future__ import annotations

import pytest
import torch

import frugal
from frugal.exporters.reload import load_compressed
from frugal.errors import FrugalError
from frugal.exporters import FORMATS
from frugal.exporters.gptq import read_gptq


def same(a, b) -> bool:
    zp = (a.zero_point is None and b.zero_point is None) or torch.equal(a.zero_point, b.zero_point)
    return (torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and a.scale.dtype == b.scale.dtype and zp
            and a.bits == b.bits and a.group_size == b.group_size)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 64, False), (8, -1, True)])
def test_compressed_tensors_read_back_and_reexport_exactly(tiny_model_dir, tmp_path, bits, group, sym):
    model_dir = tiny_model_dir("llama")
    recipe = {"method": "rtn", "weights": {"bits": bits, "group_size": group, "symmetric": sym, "scale_dtype": "float16"}}
    c = frugal.compress(model_dir, recipe)
    c.save(tmp_path / "ct")
    back = load_compressed(tmp_path / "ct")
    assert back.report.recipe == c.report.recipe
    assert set(back.quantized) == set(c.quantized)
    assert all(same(back.quantized[n], c.quantized[n]) for n in c.quantized)
    for name, mod in back.model.named_modules():  # frugal's float32 arithmetic, not the loader's float16
        if name in c.quantized:
            assert torch.equal(mod.weight.detach(), c.quantized[name].dequantize())
    for fmt in FORMATS:
        back.save(tmp_path / fmt, fmt=fmt)
    gptq = read_gptq(tmp_path / "gptq")
    assert all(same(gptq[n], c.quantized[n]) for n in c.quantized)


def test_gguf_targeted_compression_cannot_be_reexported(tiny_model_dir, tmp_path):
    c = frugal.compress(tiny_model_dir("llama"), {"method": "rtn", "gguf_type": "Q8_0"})
    with pytest.raises(FrugalError, match="only --format gguf"):
        c.save(tmp_path / "ct", fmt="compressed-tensors")
    assert not (tmp_path / "ct").exists()
