"""Per-layer schemes (recipe.overrides): strict config, the engine applies them, compressed-tensors
(config groups), GGUF (per-tensor types) and ONNX hold them, GPTQ refuses them before any work."""

from __future__ import annotations

import json

import pytest
import torch

import frugal
from frugal.config import Recipe
from frugal.errors import FrugalError

MIXED = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "overrides": [
    {"match": "model.layers.0.*", "weights": {"bits": 8, "group_size": 64}},
    {"match": "*.mlp.down_proj", "weights": {"bits": 3, "group_size": 32}}]}


def test_overrides_round_trip_and_are_strict(tmp_path):
    r = Recipe.from_dict(MIXED)
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    assert r.scheme_for("model.layers.0.mlp.down_proj").bits == 8  # first match wins
    assert r.scheme_for("model.layers.1.mlp.down_proj").bits == 3
    assert r.scheme_for("model.layers.1.self_attn.q_proj").bits == 4
    with pytest.raises(FrugalError, match=r"recipe.overrides\[0\].weights.bits=5"):
        Recipe.from_dict({"overrides": [{"match": "*", "weights": {"bits": 5}}]})
    with pytest.raises(FrugalError, match=r"unknown key 'recipe.overrides\[0\].bitz'"):
        Recipe.from_dict({"overrides": [{"bitz": 5}]})
    with pytest.raises(FrugalError, match="needs recipe.gguf_type"):
        Recipe.from_dict({"overrides": [{"match": "*", "ggml_type": "Q6_K"}]})


def test_mixed_compressed_tensors_reloads_with_identical_logits(tiny_model_dir, tmp_path):
    import transformers

    c = frugal.compress(tiny_model_dir("llama"), MIXED)
    got = {n: (q.bits, q.group_size) for n, q in c.quantized.items()}
    assert got["model.layers.0.mlp.down_proj"] == (8, 64)
    assert got["model.layers.1.mlp.down_proj"] == (3, 32)
    assert got["model.layers.1.self_attn.q_proj"] == (4, 32)
    c.save(tmp_path / "ct")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 3
    from frugal.load.model import load_model

    m = load_model(tmp_path / "ct").model  # frugal's reader: exact with 16-bit scales
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, c.model(ids).logits)
    c.save(tmp_path / "onnx", fmt="onnx")
    with pytest.raises(FrugalError, match="GPTQ checkpoint holds one scheme"):
        c.save(tmp_path / "gptq", fmt="gptq")


def test_ggml_type_overrides_set_per_tensor_types(tiny_model_dir, tmp_path):
    recipe = {"method": "rtn", "gguf_type": "Q4_0", "overrides": [{"match": "*.v_proj", "ggml_type": "Q8_0"}]}
    c = frugal.compress(tiny_model_dir("qwen2"), recipe)
    c.save(tmp_path / "g", fmt="gguf")
    tensors = json.loads((tmp_path / "g" / "frugal.json").read_text())["gguf"]["tensors"]
    assert tensors["blk.0.attn_v.weight"]["type"] == "Q8_0" and tensors["blk.0.attn_q.weight"]["type"] == "Q4_0"
    with pytest.raises(FrugalError, match="Q4_K needs rows that are a multiple of 256"):
        frugal.compress(tiny_model_dir("qwen2"), {"gguf_type": "Q4_0", "method": "rtn",
                                                  "overrides": [{"match": "*", "ggml_type": "Q4_K"}]})


def test_group_fit_is_checked_per_override(tiny_model_dir):
    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "strict_groups": True,
              "overrides": [{"match": "*.down_proj", "weights": {"bits": 4, "group_size": 128}}]}
    with pytest.raises(FrugalError, match="down_proj: in_features 96 is not a multiple of group size 128"):
        frugal.compress(tiny_model_dir("llama", intermediate_size=96), recipe)


def test_narrow_layers_take_a_group_that_fits(tiny_model_dir, tmp_path, caplog):
    """Without strict_groups a layer the group size does not divide takes the largest group that does (or
    per channel), recorded as an override in frugal.json; the other layers keep the recipe's."""
    import logging

    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 64}, "seed": 0}
    with caplog.at_level(logging.WARNING):
        c = frugal.compress(tiny_model_dir("llama", intermediate_size=96), recipe)
    assert "model.layers.0.mlp.down_proj (32)" in caplog.text
    down, up = c.quantized["model.layers.0.mlp.down_proj"], c.quantized["model.layers.0.mlp.up_proj"]
    assert down.group_size == 32 and down.scale.shape == (64, 3) and up.group_size == 64
    c.save(tmp_path / "o")
    saved = json.loads((tmp_path / "o" / "frugal.json").read_text())
    assert saved["layers"]["model.layers.1.mlp.down_proj"]["group_size"] == 32
    assert {"match": "model.layers.1.mlp.down_proj"}.items() <= saved["recipe"]["overrides"][1].items()
    narrow = frugal.compress(tiny_model_dir("llama", intermediate_size=80), recipe)  # 80: no group divides it
    assert narrow.quantized["model.layers.0.mlp.down_proj"].group_size == -1
