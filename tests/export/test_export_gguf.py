"""GGUF export: tensors read back equal frugal's weights, transformers' GGUF loader reproduces
frugal's logits, the bytes are deterministic, llama.cpp (when installed) runs the file, and what GGUF
cannot hold is refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import frugal
from frugal.errors import FrugalError
from frugal.exporters.gguf import _permute_rows

WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of 256: K-quants without fallback


def save(model_dir: Path, recipe: dict, out: Path):
    c = frugal.compress(model_dir, recipe)
    c.save(out, fmt="gguf")
    return c


def read_back(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.gguf dequantized by gguf-py, as (rows, cols) float32."""
    reader = gguf.GGUFReader(out / "model.gguf")
    res = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        res[t.name] = torch.from_numpy(np.array(data, dtype=np.float32))
    return res


def hf_logits(out: Path, ids: torch.Tensor, **config) -> torch.Tensor:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32, **config)
    with torch.no_grad():
        return m(ids).logits


def ids_for(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_gguf_type_recipe_reloads_in_transformers_with_identical_logits(tiny_model_dir, tmp_path, family):
    model_dir = tiny_model_dir(family, **WIDE)
    c = save(model_dir, {"method": "rtn", "gguf_type": "Q4_K_M"}, tmp_path / "out")
    ids = ids_for()
    with torch.no_grad():
        ours = c.model(ids).logits
    # transformers' GGUF reader ignores qwen3's attention.key_length (head_dim 16 != 256 / 4 here)
    config = {"head_dim": c.model.config.head_dim} if family == "qwen3" else {}
    assert torch.equal(hf_logits(tmp_path / "out", ids, **config), ours)
    records = json.loads((tmp_path / "out" / "frugal.json").read_text())["gguf"]["tensors"]
    types = {r["type"] for r in records.values()}
    assert {"F32", "Q4_K", "Q6_K"} <= types <= {"F32", "Q4_K", "Q6_K", "Q5_0"}  # qwen3's o_proj rows: 64 -> Q5_0
    assert all(r["exact"] for r in records.values())


def test_tensors_read_back_equal_frugal_weights(tiny_model_dir, tmp_path):
    """Q4_K_M on a llama: q/k rows are reordered for llama.cpp's rotary layout; undo it and compare."""
    model_dir = tiny_model_dir("llama", **WIDE)
    c = save(model_dir, {"method": "rtn", "gguf_type": "Q4_K_M"}, tmp_path / "out")
    back = read_back(tmp_path / "out")
    cfg = c.model.config
    for i in range(cfg.num_hidden_layers):
        for hf, gg, heads in (("q_proj", "attn_q", cfg.num_attention_heads), ("k_proj", "attn_k", cfg.num_key_value_heads),
                              ("v_proj", "attn_v", None)):
            qw = c.quantized[f"model.layers.{i}.self_attn.{hf}"]
            stored = back[f"blk.{i}.{gg}.weight"]
            if heads:
                stored = stored[torch.argsort(_permute_rows(heads, stored.shape[0]))]
            assert torch.equal(stored, qw.dequantize())
    emb = c.quantized["model.embed_tokens"]
    assert torch.equal(back["token_embd.weight"], emb.dequantize())


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, True), (8, 32, True), (3, 64, False), (2, -1, True)])
def test_integer_grids_carry_over_exactly_with_fp16_scales(tiny_model_dir, tmp_path, bits, group, sym):
    model_dir = tiny_model_dir("qwen2")
    recipe = {"method": "rtn", "weights": {"bits": bits, "group_size": group, "symmetric": sym, "scale_dtype": "float16"}}
    c = save(model_dir, recipe, tmp_path / "out")
    back = read_back(tmp_path / "out")
    for name, qw in c.quantized.items():
        i, rest = name.split(".")[2], name.split(".")[-1]
        gg = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[rest]
        assert torch.equal(back[f"blk.{i}.{gg}.weight"], qw.dequantize()), name
    records = json.loads((tmp_path / "out" / "frugal.json").read_text())["gguf"]["tensors"]
    quant = [r for r in records.values() if r["type"] not in ("F16", "F32")]
    assert quant and all(r["exact"] for r in quant)
    assert {r["type"] for r in quant} == {"Q8_0" if bits == 8 else "Q4_0"}


def test_asymmetric_4bit_maps_to_q4_1_with_reported_error(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    c = save(model_dir, {"method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": False,
                                                      "scale_dtype": "float16"}}, tmp_path / "out")
    records = json.loads((tmp_path / "out" / "frugal.json").read_text())["gguf"]["tensors"]
    q41 = [r for r in records.values() if r["type"] == "Q4_1"]
    assert len(q41) == len(c.quantized)
    assert all(0 < r["rel_error"] < 2e-3 for r in q41)  # the offset rounded to fp16: small, not zero


def test_float32_scales_change_weights_by_fp16_rounding_only(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    c = save(model_dir, {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}, tmp_path / "out")
    ids = ids_for(1)
    with torch.no_grad():
        ours = c.model(ids).logits
    diff = (hf_logits(tmp_path / "out", ids) - ours).abs().max().item()
    assert 0 < diff < 1e-2 * ours.abs().max().item()


def test_gptq_gguf_compress_is_deterministic(tiny_model_dir, tmp_path):
    from conftest import CALIB_TEXT, dir_digest

    model_dir = tiny_model_dir("llama", **WIDE)
    recipe = {"method": "gptq", "gguf_type": "Q4_0", "calibration": {"num_samples": 4, "seq_len": 32}}
    for name in ("a", "b"):
        frugal.compress(model_dir, recipe, CALIB_TEXT).save(tmp_path / name, fmt="gguf")
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b")


def test_gemma3_norms_are_stored_plus_one(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("gemma3")
    c = save(model_dir, {"method": "rtn", "gguf_type": "Q8_0"}, tmp_path / "out")
    back = read_back(tmp_path / "out")
    hf = c.model.model.layers[0].input_layernorm.weight.detach()
    assert torch.equal(back["blk.0.attn_norm.weight"], hf + 1)
    assert torch.equal(back["blk.0.attn_q.weight"], c.quantized["model.layers.0.self_attn.q_proj"].dequantize())


@pytest.mark.parametrize("family", ["opt"])
def test_unsupported_architecture_is_refused_before_work(tiny_model_dir, tmp_path, family):
    with pytest.raises(FrugalError, match=f"architecture '{family}' is not supported"):
        frugal.compress(tiny_model_dir(family), {"method": "rtn", "gguf_type": "Q4_0"}, formats=("gguf",))


def test_cli_export_and_refusals(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    cli = [sys.executable, "-m", "frugal.cli.main"]
    run = lambda *a: subprocess.run([*cli, *a], capture_output=True, text=True)  # noqa: E731
    ct = tmp_path / "ct"
    r = run("compress", str(model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--scale-dtype", "float16", "--no-eval", "-o", str(ct))
    assert r.returncode == 0, r.stderr
    r = run("export", str(ct), "--format", "gguf", "-o", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    assert "tensors exact" in r.stdout and (tmp_path / "g" / "model.gguf").is_file()
    r = run("compress", str(model_dir), "--method", "rtn", "--gguf-type", "Q4_K_M", "--format", "onnx",
            "--no-eval", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "only --format gguf" in r.stderr
    assert not (tmp_path / "x").exists()
    r = run("export", str(model_dir), "--format", "gguf", "-o", str(tmp_path / "y"))
    assert r.returncode == 2 and "not a frugal compressed-tensors directory" in r.stderr


def test_llama_cpp_runs_the_file(tiny_model_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a benchmark dependency (bench/.venvs)")
    model_dir = tiny_model_dir("llama", **WIDE)
    c = save(model_dir, {"method": "rtn", "gguf_type": "Q4_K_M"}, tmp_path / "out")
    ids = ids_for(2)
    llm = llama_cpp.Llama(str(tmp_path / "out" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(np.array(llm.scores[: ids.shape[1]]))
    with torch.no_grad():
        ours = c.model(ids).logits[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()


def test_gemma3_reloads_with_its_sliding_window_pattern(tiny_model_dir, tmp_path):
    """Five sliding layers then one global (Gemma 3's pattern); transformers' GGUF reader does not read the
    attention scale (llama.cpp uses 1/sqrt(head_dim)), so it is passed to from_pretrained."""
    import transformers

    model_dir = tiny_model_dir("gemma3", num_hidden_layers=6,
                               layer_types=["sliding_attention"] * 5 + ["full_attention"])
    c = save(model_dir, {"method": "rtn", "gguf_type": "Q8_0"}, tmp_path / "out")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32,
                                                          query_pre_attn_scalar=c.model.config.query_pre_attn_scalar)
    assert m.config.layer_types == c.model.config.layer_types
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(3))  # longer than the window
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, c.model(ids).logits, atol=1e-5, rtol=0)
