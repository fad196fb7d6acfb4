"""recipe.storage: what stays unquantized (and "model" scales) is stored in 16 bits, the model frugal measured
is the one in the file, tied embeddings are stored once, and float32 storage still gives the old files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

RTN = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_unquantized_tensors_and_scales_are_16_bit_and_exact(tiny_model_dir, tmp_path, dtype):
    """Every float tensor in the file has the storage dtype and equals the in-memory model's value exactly;
    the tied embedding is stored once; config.json says the dtype; frugal's reader gives the same logits."""
    import frugal
    from frugal.load.model import load_model

    src = tiny_model_dir("llama", tie_word_embeddings=True)
    res = frugal.compress(str(src), {**RTN, "storage": {"dtype": dtype, "scale_dtype": dtype}})
    out = res.save(tmp_path / "o")
    stored = _tensors(out)
    floats = {k: t for k, t in stored.items() if t.is_floating_point()}
    assert floats and all(t.dtype == getattr(torch, dtype) for t in floats.values())
    state = res.model.state_dict()
    for name, t in floats.items():
        if name.endswith(".weight_scale"):
            qw = res.quantized[name[: -len(".weight_scale")]]
            assert torch.equal(t, qw.scale)
        else:
            assert torch.equal(t.float(), state[name]), name  # rounded before calibration, written unchanged
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(load_model(out).model(ids).logits, res.model(ids).logits)


def test_16_bit_storage_halves_the_unquantized_bytes(tiny_model_dir, tmp_path):
    """bfloat16 storage: every float tensor takes half of float32's bytes, the packed codes the same."""
    import frugal

    src = tiny_model_dir("qwen2")
    sizes = {}
    for dtype in ("bfloat16", "model"):
        out = frugal.compress(str(src), {**RTN, "storage": {"dtype": dtype, "scale_dtype": dtype}}).save(tmp_path / dtype)
        t = _tensors(out)
        sizes[dtype] = {k: v.numel() * v.element_size() for k, v in t.items()}
        if dtype == "model":  # the loaded model's dtype: float32 files, as version 1 recipes wrote
            assert all(v.dtype in (torch.float32, torch.int32, torch.int64) for v in t.values())
    floats = [k for k in sizes["model"] if not k.endswith(("weight_packed", "weight_shape", "weight_zero_point"))]
    assert all(sizes["bfloat16"][k] * 2 == sizes["model"][k] for k in floats)


def test_default_scales_are_float16_beside_bfloat16_tensors(tiny_model_dir, tmp_path):
    """The default storage: scales in float16 (finer than bfloat16), the other float tensors in bfloat16;
    the file holds the scales frugal quantized against."""
    import frugal

    res = frugal.compress(str(tiny_model_dir("llama")), RTN)
    stored = _tensors(res.save(tmp_path / "o"))
    scales = {k: t for k, t in stored.items() if k.endswith(".weight_scale")}
    others = {k: t for k, t in stored.items() if t.is_floating_point() and k not in scales}
    assert scales and all(t.dtype == torch.float16 for t in scales.values())
    assert others and all(t.dtype == torch.bfloat16 for t in others.values())
    assert all(torch.equal(t, res.quantized[k[: -len(".weight_scale")]].scale) for k, t in scales.items())


def test_version_1_recipe_reproduces_float32_files(tiny_model_dir, tmp_path):
    """A version 1 recipe (frugal.json of an older run) compresses as it did: float32 tensors, positive
    max|w| / 7.5 scales."""
    import frugal

    src = tiny_model_dir("llama")
    res = frugal.compress(str(src), {"version": 1, **RTN})
    assert res.report.recipe.storage.dtype == "model" and not res.report.recipe.weights.signed_scale
    assert all((qw.scale > 0).all() and qw.scale.dtype == torch.float32 for qw in res.quantized.values())


def test_gptq_export_of_bfloat16_scales_is_exact(tiny_model_dir, tmp_path, caplog):
    """bfloat16 scales convert to GPTQ's float16 exactly: no change warning, the file reloads to the same weights."""
    import frugal
    from frugal.exporters.gptq import read_gptq

    src = tiny_model_dir("llama")
    res = frugal.compress(str(src), {**RTN, "storage": {"scale_dtype": "bfloat16"}})
    with caplog.at_level(logging.WARNING):
        out = res.save(tmp_path / "g", fmt="gptq")
    assert not [r for r in caplog.records if "float16" in r.getMessage()]
    back = read_gptq(out)
    modules = dict(res.model.named_modules())
    assert all(torch.equal(back[n].dequantize(), modules[n].weight) for n in back)


def test_cli_dtype_and_engines_line(tiny_model_dir, tmp_path, capsys):
    """`frugal compress --dtype float16` stores float16 and prints where the output runs."""
    from frugal.cli.main import main

    src = tiny_model_dir("llama")
    out = tmp_path / "c"
    assert main(["compress", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "--dtype", "float16",
                 "--no-eval", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    printed = capsys.readouterr().out
    assert "Runs in (compressed-tensors)" in printed and f"vllm serve {out}" in printed


def test_weights_to_quantize_reach_the_quantizer_unrounded(tiny_model_dir):
    """16-bit storage rounds what stays unquantized, not the weights the recipe quantizes: with the scale
    dtype fixed, bfloat16 and float32 storage give RTN the same codes and scales."""
    import frugal

    src = tiny_model_dir("llama")
    runs = [frugal.compress(str(src), {**RTN, "storage": {"dtype": dtype, "scale_dtype": "float32"}})
            for dtype in ("bfloat16", "model")]
    assert runs[0].quantized
    for n, a in runs[0].quantized.items():
        b = runs[1].quantized[n]
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale), n
