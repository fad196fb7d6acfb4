"""GPT-2 style Conv1D layers (weight stored (in, out)) as a linear kind: held as nn.Linear in memory, written in
the checkpoint's layout, quantized along the input dimension like every linear, streamed and exported alike."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import CALIB_TEXT, TOKENIZER

import frugal

RECIPE = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 4, "seq_len": 64},
          "storage": {"dtype": "float32"}, "seed": 0}


def _gpt2(dest, **kw):
    import transformers

    if not TOKENIZER.is_dir():
        pytest.skip(f"{TOKENIZER}: shared tokenizer missing")
    cfg = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                                  eos_token_id=2, **kw)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(dest)
    return model


def test_conv1d_as_linear_keeps_function_and_checkpoint_layout(tmp_path):
    """The converted model computes the same logits, and its state dict is the Conv1D model's, key for key
    and bit for bit (so the writers' float tensors and the reader's load need nothing per family)."""
    from frugal.load.linears import TransposedLinear, as_linears

    model = _gpt2(tmp_path / "src")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        assert not as_linears(model)  # no MoE experts
        out = model(ids).logits
    lin = model.transformer.h[0].attn.c_attn
    assert isinstance(lin, TransposedLinear) and lin.weight.shape == (192, 64)  # (out, in) in memory
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    model.load_state_dict(before)  # and back: the checkpoint layout is transposed on the way in
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, before["transformer.h.0.attn.c_attn.weight"].t())


def test_gptq_on_conv1d_reloads_in_frugal_and_refuses_loudly_in_transformers(tmp_path, caplog):
    """Every Conv1D quantized (rows = outputs, groups along the inputs); frugal's reader rebuilds the exact
    model; plain transformers, which cannot load packed Conv1D (compressed-tensors quantizes nn.Linear only),
    refuses the shapes instead of initialising the layers at random, and the save says so."""
    import transformers

    from frugal.load.model import load_model

    _gpt2(tmp_path / "src")
    c = frugal.compress(tmp_path / "src", RECIPE, CALIB_TEXT)
    layers = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert set(c.quantized) == {f"transformer.h.{i}.{n}" for i in range(2) for n in layers}
    qw = c.quantized["transformer.h.0.mlp.c_proj"]
    assert qw.q.shape == (64, 256) and qw.scale.shape == (64, 8)  # (out, in), in / 32 groups
    with caplog.at_level(logging.WARNING):
        c.save(tmp_path / "out")
    assert "cannot load packed Conv1D" in caplog.text
    own = load_model(tmp_path / "out").model
    assert all(torch.equal(own.state_dict()[k], v) for k, v in c.model.state_dict().items())
    with pytest.raises(RuntimeError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_streamed_conv1d_equals_in_memory(tmp_path):
    """--stream reads the (in, out) checkpoint tensors into the linear layout: the same tensors as in memory."""
    from safetensors.torch import load_file

    from frugal.compression.stream import compress_streaming

    _gpt2(tmp_path / "src")
    frugal.compress(tmp_path / "src", RECIPE, CALIB_TEXT).save(tmp_path / "mem")
    compress_streaming(tmp_path / "src", RECIPE, tmp_path / "st", CALIB_TEXT)
    mem = load_file(tmp_path / "mem" / "model.safetensors")
    st = {k: v for f in sorted((tmp_path / "st").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(st) == set(mem) and all(torch.equal(st[k], mem[k]) for k in mem)


def test_gpt2_gguf_tensors_are_the_linear_layout(tmp_path):
    """llama.cpp's gpt2 wants (out, in) tensors: the GGUF's Q4_0 attn_qkv dequantizes (gguf-py) to frugal's
    c_attn weight exactly, and the float position embedding is written as is (in F16)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    _gpt2(tmp_path / "src")
    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "storage": {"dtype": "float32", "scale_dtype": "float16"}}
    c = frugal.compress(tmp_path / "src", recipe, formats=("gguf",))
    c.save(tmp_path / "g", fmt="gguf")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "g" / "model.gguf").tensors}
    qkv = tensors["blk.0.attn_qkv.weight"]
    got = torch.from_numpy(dequantize(qkv.data, qkv.tensor_type).copy()).reshape(192, 64)
    assert torch.equal(got, c.model.transformer.h[0].attn.c_attn.weight.detach())
    pos = torch.from_numpy(tensors["position_embd.weight"].data.copy())  # float tensors: F16 by default
    assert torch.equal(pos, c.model.transformer.wpe.weight.detach().to(pos.dtype))


def test_gguf_refuses_what_llamacpps_gpt2_graph_does_not_compute(tmp_path):
    """GGUFArch.requires: a config llama.cpp's graph would compute differently is one line, before any work."""
    from frugal.errors import FrugalError

    _gpt2(tmp_path / "src", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(FrugalError, match="scale_attn_by_inverse_layer_idx=True"):
        frugal.compress(tmp_path / "src", {**RECIPE, "method": "rtn"}, formats=("gguf",))
