"""AWQ glue on tiny models of every family: exact folding, end-to-end RTN/GPTQ + AWQ, recipes, refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, _COMMON

ALL = sorted(FAMILIES)
# Scaling pairs per block with as many key/value heads as query heads (so v_proj -> o_proj applies).
PAIRS_MHA = {"llama": 4, "mistral": 4, "qwen2": 4, "qwen3": 4, "gemma3": 4, "phi3": 2, "opt": 4}


def tiny(family: str, seed: int = 0, **overrides):
    """A tiny random model of `family` built in memory (no tokenizer needed)."""
    import transformers

    cls_name, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def randomize_norms(model, seed: int = 0) -> None:
    """Norm weights (and LayerNorm biases) away from their initial ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower():
            mod.weight.copy_(mod.weight + 0.3 * torch.randn(mod.weight.shape, generator=g))
            if getattr(mod, "bias", None) is not None:
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))


@torch.no_grad()
def add_outlier_channels(model, family: str, factor: float = 20.0, seed: int = 3) -> None:
    """Make 4 hidden channels of every block norm `factor` x larger, the activation outliers AWQ is for."""
    from frugal.load.blocks import find_blocks

    g = torch.Generator().manual_seed(seed)
    offset = 1.0 if family == "gemma3" else 0.0
    for mod in find_blocks(model)[1].modules():
        if "norm" in type(mod).__name__.lower() and mod.weight.shape[0] == model.config.hidden_size:
            idx = torch.randperm(mod.weight.shape[0], generator=g)[:4]
            mod.weight[idx] = (mod.weight[idx] + offset) * factor - offset


@pytest.mark.parametrize("family", ALL)
def test_folding_scales_keeps_the_logits(family):
    """Folding arbitrary positive scales into every pair (no quantization) changes no logit by more
    than 1e-5 relative, for norms with offsets and biases and for linear -> linear pairs."""
    from frugal.compression.transforms.awq import block_config, fold_scales, scale_pairs
    from frugal.families import family as family_record
    from frugal.load.blocks import find_blocks

    model = tiny(family) if family == "opt" else tiny(family, num_key_value_heads=4)
    randomize_norms(model)
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(2)
    folded = 0
    for i, block in enumerate(find_blocks(model)[1]):
        cfg = block_config(block, f"block {i}")
        pairs = scale_pairs(block, cfg, f"block {i}")
        assert len(pairs) == PAIRS_MHA[family]
        for p in pairs:
            lins = [block.get_submodule(n) for n in p.linears]
            s = torch.rand(lins[0].in_features, generator=g) * 4 + 0.2
            fold_scales(block.get_submodule(p.prev), lins, s, family_record(cfg.model_type).norm.offset)
            folded += 1
    with torch.no_grad():
        out = model(ids).logits
    assert folded == 2 * PAIRS_MHA[family]
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_grouped_query_attention_skips_v_to_o():
    """With fewer key/value heads than query heads, v_proj's output is narrower than o_proj's input:
    that pair is left out, the others stay."""
    from frugal.compression.transforms.awq import block_config, scale_pairs

    block = tiny("llama").model.layers[0]
    prevs = [p.prev for p in scale_pairs(block, block_config(block, "b"), "b")]
    assert prevs == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]


def _mean_block_error(model, ref, ids) -> float:
    from frugal.evaluation.blockerror import block_errors

    errs = block_errors(model, ref, ids)
    return sum(e["rel_error"] for e in errs) / len(errs)


@pytest.mark.parametrize("family", ALL)
def test_awq_end_to_end(family, tmp_path):
    """On a tiny model with outlier channels (3-bit g32): RTN+AWQ and GPTQ+AWQ run, their
    compressed-tensors output reloads with the same logits, and AWQ lowers the per-block output
    error of RTN (by 10%+) and, with scales alone, of GPTQ."""
    import transformers

    import frugal
    from frugal.load.model import load_model

    transformers.logging.set_verbosity_error()
    ref = tiny(family)
    add_outlier_channels(ref, family)
    calib = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(5))

    def run(method, **awq):
        recipe = {"method": method, "weights": {"bits": 3, "group_size": 32}, "awq": awq,
                  "calibration": {"num_samples": 8, "seq_len": 64}}
        return frugal.compress(ref, recipe, calib)

    err = {}
    for method in ("rtn", "gptq"):
        err[method] = _mean_block_error(run(method).model, ref, ids)
        awq = run(method, enabled=True)
        err[method + "+awq"] = _mean_block_error(awq.model, ref, ids)
        out = awq.save(tmp_path / method)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():  # frugal's reader reproduces the model exactly; transformers' rounds (q - z) * s
            assert torch.equal(load_model(out).model(ids).logits, awq.model(ids).logits)  # to the 16-bit scales
            assert (reloaded(ids).logits - awq.model(ids).logits).abs().max() <= 2e-2
    err["gptq+awq scales"] = _mean_block_error(run("gptq", enabled=True, clip=False).model, ref, ids)
    assert err["rtn+awq"] < 0.9 * err["rtn"], err
    assert err["gptq+awq scales"] < err["gptq"], err


def test_awq_is_deterministic_and_changes_the_result():
    """Same model, data and recipe: identical codes and scales; and AWQ's codes differ from RTN's."""
    import frugal

    model = tiny("qwen2")
    add_outlier_channels(model, "qwen2")
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "awq": {"enabled": True},
              "calibration": {"num_samples": 4, "seq_len": 32}}
    a, b = frugal.compress(model, recipe, calib), frugal.compress(model, recipe, calib)
    plain = frugal.compress(model, {**recipe, "awq": {"enabled": False}})
    assert a.report.calibration["num_samples"] == 4 and plain.report.calibration["source"] is None
    for name in a.quantized:
        assert torch.equal(a.quantized[name].q, b.quantized[name].q)
        assert torch.equal(a.quantized[name].scale, b.quantized[name].scale)
    assert any(not torch.equal(a.quantized[n].q, plain.quantized[n].q) for n in a.quantized)


def test_recipe_round_trip_with_awq(tmp_path):
    """awq options survive JSON and YAML; unknown keys, bad values and GGUF targets are refused."""
    from frugal.config import AWQOptions, Recipe
    from frugal.errors import FrugalError

    r = Recipe.from_dict({"method": "gptq", "awq": {"enabled": True, "grid": 10, "clip": False, "max_shrink": 0.6,
                                                      "max_samples": 16, "max_tokens": 4096}})
    assert r.awq == AWQOptions(True, 10, False, 0.6, 16, 4096)
    assert Recipe().awq == AWQOptions() and not Recipe().awq.enabled
    (tmp_path / "r.json").write_text(r.to_json())
    (tmp_path / "r.yaml").write_text(r.to_yaml())
    assert Recipe.load(tmp_path / "r.json") == Recipe.load(tmp_path / "r.yaml") == r
    for bad, key in [({"awq": {"enable": True}}, "recipe.awq.enable"), ({"awq": {"grid": 0}}, "recipe.awq.grid"),
                     ({"awq": {"max_shrink": 0.0}}, "recipe.awq.max_shrink"),
                     ({"awq": {"enabled": "yes"}}, "recipe.awq.enabled"),
                     ({"awq": {"enabled": True}, "gguf_type": "Q4_0"}, "recipe.awq.enabled")]:
        with pytest.raises(FrugalError, match=key.replace(".", r"\.")):
            Recipe.from_dict(bad)


def test_unknown_family_is_refused_before_any_work(monkeypatch):
    """A model_type without an AWQ table stops compression, naming it, before block inputs are captured."""
    import transformers

    import frugal
    import frugal.compression.engine
    from frugal.compression.transforms.awq import check
    from frugal.errors import FrugalError

    cfg = transformers.GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(FrugalError, match="'gpt_neox'"):
        check(model)

    def no_work(*_a, **_k):
        raise AssertionError("block inputs captured before the family was checked")

    monkeypatch.setattr(frugal.compression.engine, "capture_block_inputs", no_work)
    calib = torch.randint(3, 512, (2, 16))
    with pytest.raises(FrugalError, match="'gpt_neox'"):
        frugal.compress(model, {"method": "rtn", "weights": {"group_size": 32}, "awq": {"enabled": True}}, calib)


def test_quantize_block_without_inputs_refuses_awq():
    from frugal.config import Recipe
    from frugal.compression.engine import quantize_block
    from frugal.errors import FrugalError

    block = tiny("llama").model.layers[0]
    recipe = Recipe.from_dict({"method": "rtn", "awq": {"enabled": True}})
    with pytest.raises(FrugalError, match=r"layers\.0: recipe\.awq needs calibration inputs"):
        quantize_block(block, "model.layers.0", recipe, None, (), {}, {})


def test_output_error_from_the_sampled_inputs_equals_the_gram_form():
    """Fewer tokens than inputs: ||X dW^T||^2 / n is tr(dW G dW^T), and the scale search picks the same
    alpha either way; the statistics keep the rows only while n <= in, rescaled with the Gram matrix."""
    from frugal.quant.awq import ActivationStats, output_error, rtn_quantizer, search_scales
    from frugal.quant.options import WeightScheme

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 96, generator=g) * torch.linspace(0.1, 4, 96)  # 40 tokens, 96 inputs
    st = ActivationStats(96)
    st.add(x)
    rows, gram = st.sample_rows(), st.gram()
    assert rows.shape == (40, 96)
    dw = torch.randn(24, 96, generator=g)
    assert output_error(dw, None, rows) == pytest.approx(output_error(dw, gram), rel=1e-5)
    w = torch.randn(24, 96, generator=g)
    q = [rtn_quantizer(WeightScheme(4, 32))]
    a = st.mean_abs()
    by_rows, by_gram = search_scales([w], q, a, None, 20, rows), search_scales([w], q, a, gram, 20)
    assert by_rows.alpha == by_gram.alpha and by_rows.loss == pytest.approx(by_gram.loss, rel=1e-5)
    s = torch.rand(96, generator=g) + 0.5
    st.rescale(s)
    ref = ActivationStats(96)
    ref.add(x / s)
    assert torch.allclose(st.sample_rows(), ref.sample_rows(), rtol=1e-5)
    assert output_error(dw, None, st.sample_rows()) == pytest.approx(output_error(dw, st.gram()), rel=1e-4)
    st.add(torch.randn(1, 60, 96, generator=g))  # 100 tokens > 96 inputs: the Gram form only
    assert st.sample_rows() is None
