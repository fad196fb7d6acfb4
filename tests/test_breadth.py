"""Breadth over the field's decoders: every causal-LM family transformers builds is enumerated (so a new
release shows what broke), hybrid stacks, heads not named lm_head, the family table's block override."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import CALIB_TEXT, REPO, TOKENIZER

import frugal
from frugal.errors import FrugalError

sys.path.insert(0, str(REPO / "bench"))
from zoo import causal_families, tiny_config  # noqa: E402

# Families whose decoder frugal cannot take yet, each with the one line it refuses with (none since GPT-2's
# Conv1D layers became linear layers, load.linears).
REFUSED: dict[str, str] = {}


@pytest.mark.slow
def test_every_causal_family_finds_blocks_and_unfuses_experts():
    """On the meta device (no weights): every family whose tiny config builds has a decoder block list
    with linear layers to quantize and no fused experts left, or refuses with its one line."""
    import transformers

    from frugal.load.blocks import find_blocks, quantizable_linears
    from frugal.load.experts import ExpertLinears, is_fused_experts
    from frugal.load.linears import as_linears, is_conv1d

    transformers.logging.set_verbosity_error()
    built, refused, moe = 0, {}, 0
    for mt in causal_families():
        try:
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(tiny_config(mt))
        except Exception:
            continue  # the shrunk config is invalid for this family (bench/families.py lists them)
        built += 1
        as_linears(model)
        assert not any(is_fused_experts(m) or is_conv1d(m) for m in model.modules()), mt
        try:
            name, blocks = find_blocks(model)
            layers = quantizable_linears(model, ("lm_head",))
        except FrugalError as e:
            refused[mt] = str(e)
            continue
        assert any(n.startswith(name + ".") for n in layers), mt
        experts = [m for m in model.modules() if isinstance(m, ExpertLinears)]
        if experts:
            moe += 1
            ex = experts[0]
            assert getattr(ex.expert(ex.num_experts - 1), ex.in_proj) in layers.values(), mt
    for mt, msg in refused.items():
        assert mt in REFUSED and REFUSED[mt] in msg, (mt, msg)
    assert built >= 150 and len(refused) <= len(REFUSED) and moe >= 40, (built, refused, moe)


def _save(cfg, dest: Path):
    """A random model of config `cfg` (seed 0) saved with tokenizer-512 into `dest`; the model."""
    import transformers

    if not TOKENIZER.is_dir():
        pytest.skip(f"{TOKENIZER}: shared tokenizer missing")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(dest)
    return model


def _tiny(config_cls: str, dest: Path, **kw) -> Path:
    """`_save` of a config class with the given sizes (tokenizer-512 ids)."""
    import transformers

    _save(getattr(transformers, config_cls)(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw), dest)
    return dest


def _kl_to_reload(c, out: Path) -> float:
    import transformers

    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        p = torch.log_softmax(c.model(ids, use_cache=False).logits, -1)
        q = torch.log_softmax(plain(ids, use_cache=False).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


RECIPE = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 4, "seq_len": 64},
          "storage": {"dtype": "float32"}, "seed": 0}


def test_head_by_role(tmp_path):
    """`ignore: [lm_head]` keeps the output head float whatever the family calls it (biogpt:
    `output_projection`, tied to the embedding); frugal's reader re-ties it."""
    from frugal.load.model import load_model

    src = _tiny("BioGptConfig", tmp_path / "src", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=256)
    c = frugal.compress(src, RECIPE, CALIB_TEXT)
    assert "output_projection" not in c.quantized and any("fc1" in n for n in c.quantized)
    c.save(tmp_path / "out")
    assert _kl_to_reload(c, tmp_path / "out") < 1e-3
    own = load_model(tmp_path / "out").model
    assert all(torch.equal(own.state_dict()[k], v) for k, v in c.model.state_dict().items())
    ignored_all = frugal.compress(src, {**RECIPE, "ignore": []}, CALIB_TEXT)
    assert "output_projection" in ignored_all.quantized  # the head is quantized when the recipe says so


def test_hybrid_stack_of_two_layer_classes(tmp_path):
    """olmo_hybrid mixes linear-attention and attention layers in one list: found, every block's linears
    quantized with GPTQ, plain transformers reloads it."""
    from frugal.load.blocks import find_blocks

    name, blocks = find_blocks(_save(tiny_config("olmo_hybrid"), tmp_path / "src"))
    assert name == "model.layers" and len({type(b) for b in blocks}) == 2
    c = frugal.compress(tmp_path / "src", RECIPE, CALIB_TEXT)
    linears = [n for n, m in c.model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    assert linears and all(n in c.quantized for n in linears)
    assert all(c.report.layers[n].gptq_loss is not None for n in linears)  # every one saw calibration inputs
    c.save(tmp_path / "out")
    assert _kl_to_reload(c, tmp_path / "out") < 1e-3


def test_family_record_names_the_blocks(monkeypatch):
    """A family record's `blocks` overrides the generic rule."""
    import dataclasses

    import transformers

    from frugal import families
    from frugal.load.blocks import find_blocks

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.model.extra = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
    assert find_blocks(model)[0] == "model.layers"  # most parameters, not the longest list
    record = dataclasses.replace(families.FAMILIES["llama"], blocks="model.extra")
    monkeypatch.setitem(families.FAMILIES, "llama", record)
    assert find_blocks(model)[0] == "model.extra"


def test_narrow_layers_with_strict_groups_refuse(tiny_model_dir, caplog):
    with pytest.raises(FrugalError, match=r"in_features 96 is not a multiple of group size 64 \(recipe.strict_groups\)"):
        frugal.compress(tiny_model_dir("llama", intermediate_size=96),
                        {"method": "rtn", "weights": {"group_size": 64}, "strict_groups": True})


def test_linear_subclass_family_reloads(tmp_path):
    """falcon's layers are a subclass of nn.Linear that its own _init_weights touches: frugal writes the
    dequantize-at-load flag so plain from_pretrained works (the compressed route removes `.weight`)."""
    import json

    src = _tiny("FalconConfig", tmp_path / "src", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_kv_heads=4, new_decoder_architecture=False, multi_query=True)
    c = frugal.compress(src, RECIPE, CALIB_TEXT)
    assert any("dense_h_to_4h" in n for n in c.quantized)
    c.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["dequantize"] is True
    assert _kl_to_reload(c, tmp_path / "out") < 1e-3


GGUF_ASSUMES = {"gemma2": {"query_pre_attn_scalar": 16}}  # what llama.cpp's graph assumes (see bench/gguf_families.py)


@pytest.mark.parametrize("family, arch", [("gemma", "gemma"), ("phi3", "phi3"), ("olmo2", "olmo2"),
                                          ("granite", "granite"), ("starcoder2", "starcoder2"), ("gemma2", "gemma2"),
                                          ("olmo", "olmo"), ("stablelm", "stablelm"), ("phi", "phi2"),
                                          ("gpt_neox", "gptneox"), ("bloom", "bloom"), ("glm4", "glm4"),
                                          ("gpt2", "gpt2")])
def test_gguf_architectures(tmp_path, family, arch):
    """The GGUF records added for breadth: every quantized linear stored bit-exact as Q4_0 (symmetric grid,
    float16 scales), the right llama.cpp architecture and its keys (llama.cpp parity: bench/gguf_families.py)."""
    import json

    from gguf import GGUFReader

    _save(tiny_config(family, **GGUF_ASSUMES.get(family, {})), tmp_path / "src")
    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "storage": {"dtype": "float32", "scale_dtype": "float16"}}
    c = frugal.compress(tmp_path / "src", recipe, formats=("gguf",))
    c.save(tmp_path / "g", fmt="gguf")
    reader = GGUFReader(tmp_path / "g" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == arch
    tensors = json.loads((tmp_path / "g" / "frugal.json").read_text())["gguf"]["tensors"]
    quant = {n: r for n, r in tensors.items() if r["type"] == "Q4_0"}
    assert len(quant) == len(c.quantized) and all(r["exact"] for r in quant.values())
    if arch == "granite":
        assert reader.fields["granite.residual_scale"].contents() == pytest.approx(c.model.config.residual_multiplier)


@pytest.mark.parametrize("family", ["gpt_bigcode", "rwkv", "roberta"])
def test_reload_where_family_init_or_ties_differ(tmp_path, family):
    """gpt_bigcode's _init_weights touches its MLP's weights (the dequantize flag is probed on a meta copy);
    roberta's head bias is tied to another parameter (frugal's reader accepts the alias)."""
    from frugal.load.model import load_model

    _save(tiny_config(family), tmp_path / "src")
    c = frugal.compress(tmp_path / "src", {**RECIPE, "method": "rtn"})
    c.save(tmp_path / "out")
    assert _kl_to_reload(c, tmp_path / "out") < 1e-3
    own = load_model(tmp_path / "out").model
    assert all(torch.equal(own.state_dict()[k], v) for k, v in c.model.state_dict().items())


def test_blocks_that_do_not_batch(tmp_path, caplog):
    """bloom's captured alibi is for batch 1: the engine probes it, calibrates one sequence per call (a
    warning says so), and the result is the one batch 1 gives; plain transformers reloads it."""
    _save(tiny_config("bloom"), tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        c = frugal.compress(tmp_path / "src", RECIPE, CALIB_TEXT)
    assert "do not take a batch of sequences" in caplog.text
    assert c.report.recipe.calibration.batch_size == 8  # the recipe recorded is the one asked for
    one = frugal.compress(tmp_path / "src", {**RECIPE, "calibration": {**RECIPE["calibration"], "batch_size": 1}},
                          CALIB_TEXT)
    assert all(torch.equal(c.quantized[n].q, one.quantized[n].q) for n in c.quantized)
    c.save(tmp_path / "out")
    assert _kl_to_reload(c, tmp_path / "out") < 1e-3


def test_dequantize_route_writes_one_scheme_per_kind(tmp_path, caplog):
    """transformers' dequantize-at-load route (taken for zero points, MoE and some families) decodes every
    dense layer with one config group's scheme: the most common scheme is written packed, a layer with
    another (here 8-bit) as its dequantized weight, so plain from_pretrained gives frugal's model."""
    import json

    from safetensors import safe_open

    src = _tiny("LlamaConfig", tmp_path / "src", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    recipe = {**RECIPE, "method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": False},
              "overrides": [{"match": "*.0.mlp.down_proj", "weights": {"bits": 8, "group_size": 32, "symmetric": False}}]}
    c = frugal.compress(src, recipe)
    assert c.quantized["model.layers.0.mlp.down_proj"].bits == 8
    with caplog.at_level(logging.WARNING):
        c.save(tmp_path / "out")
    assert "1 quantized layers (e.g. model.layers.0.mlp.down_proj) written dequantized" in caplog.text
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["dequantize"] is True and "model.layers.0.mlp.down_proj" in qc["ignore"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
    assert "model.layers.0.mlp.down_proj.weight" in keys and "model.layers.1.mlp.down_proj.weight_packed" in keys
    assert _kl_to_reload(c, tmp_path / "out") < 1e-6


def test_narrow_layer_family_on_the_dequantize_route_reloads(tmp_path):
    """mamba's dt_proj (4 inputs) takes a smaller group and mamba's own init needs the dequantize route:
    the narrow layer is written dequantized and plain from_pretrained reproduces frugal's result."""
    _save(tiny_config("mamba"), tmp_path / "src")
    c = frugal.compress(tmp_path / "src", {**RECIPE, "method": "rtn"})
    narrow = [n for n, qw in c.quantized.items() if qw.group_size != 32]
    assert narrow and all(n.endswith("dt_proj") for n in narrow)
    c.save(tmp_path / "out")
    assert _kl_to_reload(c, tmp_path / "out") < 1e-3
