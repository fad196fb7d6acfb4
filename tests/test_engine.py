"""The block-sequential engine's glue: block inputs, shared Hessians, outside layers, data-free data."""

from __future__ import annotations


import pytest
import torch

from conftest import CALIB_TEXT, FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_block_inputs_reproduce_the_forward(tiny_model_factory, family):
    """Running the blocks one by one from the captured inputs gives the model's own hidden states."""
    import transformers

    from frugal.load.blocks import find_blocks
    from frugal.compression.hooks import capture_block_inputs, run_block

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_factory(family)).eval()
    ids = torch.randint(3, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids)
    hidden = inputs.hidden
    with torch.no_grad():
        for i, block in enumerate(blocks[:-1]):
            hidden = [run_block(block, h, inputs.args, inputs.kwargs_per_block[i]) for h in hidden]
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[k] is the input of block k (the last entry has the final norm applied)
    assert torch.allclose(torch.cat(hidden), states[len(blocks) - 1], atol=1e-5)


def test_q_k_v_share_one_hessian(tiny_model_factory):
    """Layers fed the same tensor accumulate into one Hessian; the others get their own."""
    import transformers

    from frugal.load.blocks import block_linears, find_blocks
    from frugal.compression.hooks import HessianHooks, capture_block_inputs, run_block

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    name, blocks = find_blocks(model)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, blocks, ids)
    layers = block_linears(blocks[0], f"{name}.0", ("lm_head",))
    with HessianHooks(layers) as hooks, torch.no_grad():
        for x in inputs.hidden:
            run_block(blocks[0], x, inputs.args, inputs.kwargs_per_block[0])
            hooks.end_sample()
    h = hooks.hessians
    p = f"{name}.0"
    assert h[f"{p}.self_attn.q_proj"] is h[f"{p}.self_attn.k_proj"] is h[f"{p}.self_attn.v_proj"]
    assert h[f"{p}.mlp.gate_proj"] is h[f"{p}.mlp.up_proj"]
    assert h[f"{p}.self_attn.o_proj"] is not h[f"{p}.self_attn.q_proj"]
    assert h[f"{p}.self_attn.q_proj"].n == 2 * 16  # each sample counted once, not three times


def test_lm_head_quantized_when_not_ignored(tiny_model_factory, tmp_path):
    """With ignore=[], a tied lm_head is untied and quantized, the embedding stays float, and the
    saved model reloads with the same logits."""
    import transformers

    import frugal

    src = tiny_model_factory("llama", tie_word_embeddings=True)
    original = transformers.AutoModelForCausalLM.from_pretrained(src)
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "ignore": [],
              "calibration": {"num_samples": 2, "seq_len": 32}}
    res = frugal.compress(src, recipe, str(CALIB_TEXT))
    assert "lm_head" in res.quantized
    emb = res.model.get_input_embeddings().weight
    assert torch.equal(emb, original.get_input_embeddings().weight.to(torch.bfloat16).float())  # bf16 storage
    assert not torch.equal(res.model.lm_head.weight, emb)
    out = res.save(tmp_path / "q")
    ids = torch.arange(3, 30)[None]
    from frugal.load.model import load_model

    reloaded = load_model(out).model  # frugal's reader: (q - z) * s in float32, exactly
    with torch.no_grad():
        assert (reloaded(ids).logits - res.model(ids).logits).abs().max() <= 1e-4


def test_sharded_source_loads(tiny_model_factory, tmp_path):
    """A model saved in several safetensors shards compresses like a single-file one."""
    import transformers

    import frugal

    src = tiny_model_factory("qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    recipe = {"method": "rtn", "weights": {"bits": 8, "group_size": 32}}
    a = frugal.compress(src, recipe).model
    b = frugal.compress(sharded, recipe).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_data_free_calibration_is_deterministic(tiny_model_factory):
    """Without text, calibration sequences come from the model, identical for the same seed."""
    import frugal

    src = tiny_model_factory("llama")
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 2, "seq_len": 12}}
    a = frugal.compress(src, recipe, "data-free")
    b = frugal.compress(src, recipe, "data-free")
    assert a.report.calibration["source"] == "data-free"
    for name in a.quantized:
        assert torch.equal(a.quantized[name].q, b.quantized[name].q)


def test_nan_weight_names_the_layer(tiny_model_factory):
    """A NaN in a weight stops compression with the layer's name."""
    import transformers

    import frugal
    from frugal.errors import FrugalError

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(FrugalError, match=r"model\.layers\.1\.mlp\.up_proj: weight has NaN"):
        frugal.compress(model, {"method": "rtn", "weights": {"bits": 4, "group_size": 32}})


def test_info_counts_layer_kinds_under_a_nested_block_list(tiny_model_factory, capsys):
    """`frugal info` groups OPT's layers (blocks at model.decoder.layers) by kind, one count per block."""
    from frugal.cli.main import main

    assert main(["info", str(tiny_model_factory("opt")), "--group-size", "32"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["fc1"][:3] == ["2", "64", "128"]
    assert rows["self_attn.q_proj"][0] == "2"
    assert rows["model.decoder.project_in"][0] == "1"
