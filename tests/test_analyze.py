"""Sensitivity analysis and mixed precision: the tail re-run measures what a full forward measures, the
proxy ranks layers like the measurement, the cache is reused, and a budget gives a loadable mixed model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from frugal.analysis.analyze import analyze, cached_analyze, parse_candidate
from frugal.errors import FrugalError
from frugal.load.model import load_model
from frugal.analysis.mixed import apply, plan

# One worker runs this file in order: the --max-kl refusal test reuses the analysis its neighbour cached.
pytestmark = pytest.mark.xdist_group("test_analyze")

CANDS = ["int2g32", "int3g32", "int4g32", "int8g32", "bf16", "fp8_e4m3", "mxfp4", "nvfp4"]


def samples() -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qwen3(tiny_model_factory):
    return tiny_model_factory("qwen3")


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_measured_kl_equals_a_full_forward_with_that_layer_quantized(tiny_model_dir, family):
    # larger initial weights than the default 0.02: confident predictions, so a KL well above round-off
    model = load_model(tiny_model_dir(family, initializer_range=0.2)).model
    ids = samples()
    a = analyze(model, ids, ["int2g32", "int4g32"], ["int2g32"])
    layer = a.layers[len(a.layers) // 2]
    assert layer.kl["int2g32"] > 1e-4
    mod = dict(model.named_modules())[layer.name]
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.float(), -1)
        w = mod.weight.data.clone()
        mod.weight.data = parse_candidate("int2g32").fake_quantize(w)
        lp = F.log_softmax(model(ids).logits.float(), -1)
        mod.weight.data = w
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert layer.kl["int2g32"] == pytest.approx(kl, rel=1e-3)


def test_proxy_orders_formats_and_agrees_with_measurement(qwen3):
    model = load_model(qwen3).model
    a = analyze(model, samples(), CANDS, ["int3g32", "int2g32", "int4g32"], check_every=1)
    for ls in a.layers:
        p = ls.proxy
        assert p["int2g32"] > p["int3g32"] > p["int4g32"] > p["int8g32"] > 0
        assert p["mxfp4"] > p["fp8_e4m3"] > p["bf16"]
        assert ls.bytes["int2g32"] < ls.bytes["int4g32"] < ls.bytes["int8g32"] < ls.bytes["bf16"]
        assert ls.kl["int2g32"] > ls.kl["int4g32"]
    assert a.spearman["int2g32"] > 0.8 and a.spearman["int4g32"] > 0.8
    assert all(ls.amplification is not None and ls.amplification > 0 for ls in a.layers)


def test_analysis_is_cached_and_deterministic(qwen3):
    model = load_model(qwen3).model
    first, cached1 = cached_analyze(model, qwen3, samples(), ["int3g32", "int4g32"], ["int3g32"])
    again, cached2 = cached_analyze(model, qwen3, samples(), ["int3g32", "int4g32"], ["int3g32"])
    assert not cached1 and cached2
    assert [l.kl for l in again.layers] == [l.kl for l in first.layers]
    fresh = analyze(model, samples(), ["int3g32", "int4g32"], ["int3g32"])
    assert [l.proxy for l in fresh.layers] == [l.proxy for l in first.layers]


def test_plan_respects_budget_ties_and_improves_with_budget(qwen3):
    a = analyze(load_model(qwen3).model, samples(), CANDS, ["int3g32", "int4g32"])
    small, large = plan(a, "3.2bpw"), plan(a, "4.6bpw")
    assert small.bpw <= 3.2 and large.bpw <= 4.6
    assert large.predicted_kl < small.predicted_kl
    assert set(small.choice.values()) <= {"int2g32", "int3g32", "int4g32", "int8g32"}  # engine-loadable only
    for i in range(2):
        qkv = {small.choice[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}
        gate_up = {small.choice[f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    with pytest.raises(FrugalError, match="exactly one of"):
        plan(a)
    with pytest.raises(FrugalError):
        plan(a, "1bpw")


def test_compress_budget_writes_a_mixed_model_that_reloads(qwen3, tmp_path):
    import transformers

    out = tmp_path / "mixed"
    r = subprocess.run([sys.executable, "-m", "frugal.cli.main", "compress", str(qwen3), "--method", "rtn", "--budget",
                        "3.8bpw", "--candidates", "int2g32,int3g32,int4g32,int8g32", "--no-eval", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "frugal.json").read_text())
    assert meta["mixed_precision"]["bpw"] <= 3.8 and len(meta["mixed_precision"]["count"]) >= 2
    bits = {v["bits"] for v in meta["layers"].values()}
    assert len(bits) >= 2
    import frugal
    from frugal.config import Recipe

    recipe = Recipe.from_dict(meta["recipe"])
    c = frugal.compress(qwen3, recipe)
    from frugal.load.model import load_model

    m = load_model(out).model  # frugal's reader: (q - z) * s in float32, exactly
    ids = samples()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, c.model(ids).logits)


def test_apply_gives_exact_overrides(qwen3):
    from frugal.config import Recipe

    a = analyze(load_model(qwen3).model, samples(), ["int3g32", "int4g32"], ["int3g32"])
    p = plan(a, "3.9bpw")
    r = apply(Recipe(method="rtn"), p)
    for name, c in p.choice.items():
        assert r.scheme_for(name).bits == int(c[3])


def test_gguf_budget_allocates_ggml_types_that_reload(tiny_model_dir, tmp_path):
    import frugal
    from frugal.config import Recipe

    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512)
    a = analyze(load_model(model_dir).model, samples(), ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "int4g32"], ["Q4_K"])
    p = plan(a, "5bpw", ggml=True)
    assert set(p.choice.values()) <= {"Q4_K", "Q5_K", "Q6_K", "Q8_0"} and len(set(p.choice.values())) >= 2
    assert p.bpw <= 5
    recipe = apply(Recipe(method="rtn", gguf_type="Q4_K_M"), p)
    c = frugal.compress(model_dir, recipe)
    c.save(tmp_path / "g", fmt="gguf")
    tensors = json.loads((tmp_path / "g" / "frugal.json").read_text())["gguf"]["tensors"]
    assert tensors["blk.0.attn_q.weight"]["type"] == p.choice["model.layers.0.self_attn.q_proj"]
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32)
    ids = samples()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, c.model(ids).logits)


def test_other_measured_formats_cover_every_kth_layer(qwen3):
    a = analyze(load_model(qwen3).model, samples(), ["int3g32", "int4g32"], ["int3g32", "int4g32"], check_every=4)
    assert all("int3g32" in ls.kl for ls in a.layers)
    assert [i for i, ls in enumerate(a.layers) if "int4g32" in ls.kl] == list(range(0, len(a.layers), 4))


def test_max_kl_is_measured_and_the_target_tightened(qwen3, tmp_path, monkeypatch):
    """--max-kl: the first compression's measured KL is reported above the limit (patched), so a second,
    tighter plan runs; the result records the measured KL and the rounds."""
    import frugal.analysis.mixed
    import frugal.cli.main as cli

    real = frugal.analysis.mixed.measured_kl
    calls = []

    def first_too_high(ref, model, ids):
        kl = real(ref, model, ids)
        calls.append(kl)
        return 1.5 * kl if len(calls) == 1 else kl

    monkeypatch.setattr(frugal.analysis.mixed, "measured_kl", first_too_high)
    out = tmp_path / "mk"
    rc = cli.main(["compress", str(qwen3), "--method", "rtn", "--max-kl", "0.0006", "--candidates",
                   "int2g32,int3g32,int4g32,int8g32", "--no-eval", "-o", str(out)])
    assert rc == 0 and len(calls) == 2
    meta = json.loads((out / "frugal.json").read_text())["mixed_precision"]
    assert meta["rounds"] == 2 and meta["measured_kl"] <= 0.0006 and meta["measured_kl"] == calls[1]
    assert meta["predicted_kl"] < 0.0006  # the tightened target


def test_max_kl_below_what_the_candidates_reach_is_one_line(qwen3, tmp_path, capsys):
    import frugal.cli.main as cli

    rc = cli.main(["compress", str(qwen3), "--method", "rtn", "--max-kl", "1e-9", "--candidates", "int2g32,int3g32",
                   "--no-eval", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("frugal: error: --max-kl 1e-09:") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_gptq_aware_analysis_measures_what_gptq_does(tiny_model_dir):
    """method="gptq": each candidate is rounded by GPTQ with the layer's Hessian (here from separate
    calibration ids), so its proxy (the output error GPTQ minimises) is below round-to-nearest's on every
    layer, and the measured KL equals a full forward with that layer GPTQ-quantized."""
    from frugal.analysis.analyze import model_hessians
    from frugal.load.blocks import quantizable_linears
    from frugal.config import GPTQOptions
    from frugal.quant.gptq import gptq_quantize

    model = load_model(tiny_model_dir("llama", initializer_range=0.2)).model
    hess_ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    rtn = analyze(model, samples(), ["int2g32", "int4g32"], ["int2g32"])
    gptq = analyze(model, samples(), ["int2g32", "int4g32"], ["int2g32"], method="gptq", hessian_samples=hess_ids)
    assert gptq.calibration["method"] == "gptq" and gptq.calibration["hessian_samples"] == [4, 32]
    hs = model_hessians(model, hess_ids, quantizable_linears(model, ("lm_head",)))
    for r, g in zip(rtn.layers, gptq.layers):
        h = hs[g.name]
        w = dict(model.named_modules())[g.name].weight.data
        dw = parse_candidate("int2g32").fake_quantize(w) - w
        rtn_on_h = float(torch.einsum("oi,ij,oj->", dw, h, dw))
        assert g.proxy["int2g32"] < 0.9 * rtn_on_h
    layer = gptq.layers[1]
    mod = dict(model.named_modules())[layer.name]
    ids = samples()
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.float(), -1)
        w = mod.weight.data.clone()
        mod.weight.data = gptq_quantize(w, hs[layer.name], parse_candidate("int2g32").scheme, GPTQOptions(),
                                        None, torch.float16).weight.dequantize()
        lp = F.log_softmax(model(ids).logits.float(), -1)
        mod.weight.data = w
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert layer.kl["int2g32"] == pytest.approx(kl, rel=1e-3)


def test_mixed_checkpoint_with_per_block_schemes_reloads_exactly(tiny_model_dir, tmp_path):
    """The same layer kind at different bit widths in different blocks (what an allocation produces on a
    real model): frugal's loader and transformers' default route (compressed-tensors decompresses each
    layer with its own config group) read it back exactly; only transformers' `dequantize=True` route
    unpacks every dense layer with one group."""
    import transformers

    import frugal

    src = tiny_model_dir("llama", num_hidden_layers=4)
    over = [{"match": "model.layers.0.*", "weights": {"bits": 3, "group_size": 64, "scale_dtype": "float16"}},
            {"match": "model.layers.2.*", "weights": {"bits": 2, "group_size": 32, "scale_dtype": "float16"}}]
    c = frugal.compress(src, {"method": "rtn", "weights": {"bits": 4, "group_size": 32, "scale_dtype": "float16"},
                              "overrides": over})
    c.save(tmp_path / "mixed")
    back = load_model(tmp_path / "mixed").model
    ids = samples()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, c.model(ids).logits)
    for name, qw in c.quantized.items():
        assert torch.equal(dict(back.named_modules())[name].weight, qw.dequantize())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, c.model(ids).logits)
