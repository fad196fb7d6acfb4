"""config.json as engines read it: `architectures` names the causal-LM class even when the source config
had none (a model converted from GGUF has none; vLLM then resolves the headless `LlamaModel`)."""

from __future__ import annotations

import json

import pytest


def _without_architectures(model_dir):
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("architectures", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return model_dir


@pytest.mark.parametrize("family,cls", [("llama", "LlamaForCausalLM"), ("gemma3", "Gemma3ForCausalLM")])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "stream"])
def test_architectures_written(tiny_model_dir, tmp_path, family, cls, fmt):
    import frugal
    from frugal.compression.stream import compress_streaming

    src = _without_architectures(tiny_model_dir(family))
    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}
    out = tmp_path / "out"
    if fmt == "stream":
        compress_streaming(str(src), recipe, out)
    else:
        frugal.compress(str(src), recipe).save(out, fmt=fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls]
    assert cfg["dtype"] == "bfloat16"  # recipe.storage.dtype, the default


def test_existing_architectures_are_kept(tiny_model_dir, tmp_path):
    import frugal

    src = tiny_model_dir("qwen3")
    cfg = json.loads((src / "config.json").read_text())
    frugal.compress(str(src), {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}).save(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["architectures"] == cfg["architectures"]
