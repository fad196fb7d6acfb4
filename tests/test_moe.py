"""MoE experts: each expert quantized as its own matrix, with statistics from the tokens routed to it, routers
kept float, written under the checkpoint's own expert names so plain transformers reloads it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import CALIB_TEXT, TOKENIZER, _TOKEN_IDS

import frugal
from frugal.errors import FrugalError
from frugal.load.experts import ExpertLinears, expert_groups, unfuse_experts

pytestmark = pytest.mark.xdist_group("moe")

_MOE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=1024, num_experts_per_tok=2, **_TOKEN_IDS)
# family -> config class and arguments: per-expert checkpoints (mixtral: w1/w3/w2; qwen: gate/up/down), a
# shared expert with its gate (qwen2_moe), an un-normalised router (olmoe) and a fused 3-D checkpoint with
# biases and a transposed layout (gpt_oss: experts stored dequantized).
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                         shared_expert_intermediate_size=64, layer_types=["full_attention"] * 2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                         norm_topk_prob=True)),  # as Qwen3-30B-A3B (and llama.cpp) do
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=8, num_key_value_heads=4)),  # no GQA, as OLMoE
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=64, num_local_experts=8,
                                     layer_types=["sliding_attention", "full_attention"], sliding_window=16)),
}
RECIPE = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 8, "seq_len": 64},
          "storage": {"dtype": "float32", "scale_dtype": "float32"}, "seed": 0}
# Plain from_pretrained dequantizes (q - z) * s itself; measured KL to frugal's in-memory model <= 4e-8.
RELOAD_KL = 1e-3


def build_moe(family: str, dest: Path, seed: int = 0) -> Path:
    """A tiny random MoE model of `family` plus tokenizer-512, saved with safetensors."""
    import transformers

    if not TOKENIZER.is_dir():
        pytest.skip(f"{TOKENIZER}: shared tokenizer missing")
    cls, kw = MOE_FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**_MOE, **kw})).eval()
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(dest)
    return dest


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), -1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean per-token KL(p || q) of log-probabilities."""
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each family compressed with GPTQ W4 g32 (float32 storage) and saved."""
    out = {}
    for family in MOE_FAMILIES:
        root = tmp_path_factory.mktemp(family)
        src = build_moe(family, root / "src")
        res = frugal.compress(src, RECIPE, CALIB_TEXT)
        res.save(root / "out")
        out[family] = (src, root / "out", res)
    return out


IDS = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_quantized_routers_float(runs, family):
    _, _, res = runs[family]
    groups = expert_groups(res.model)
    assert groups, "the experts were not unfused"
    for g, ex in groups.items():
        for e in range(ex.num_experts):
            for proj in (ex.in_proj, "down_proj"):
                assert f"{g}.{e}.{proj}" in res.quantized
                lin = getattr(ex.expert(e), proj)
                assert torch.equal(lin.weight, res.quantized[f"{g}.{e}.{proj}"].dequantize(lin.weight.dtype))
    floats = [n for n, m in res.model.named_modules() if isinstance(m, nn.Linear) and n not in res.quantized]
    assert all(n == "lm_head" or n.endswith("shared_expert_gate") or ".router" in n for n in floats), floats
    if family == "qwen2_moe":
        assert any("shared_expert.down_proj" in n for n in res.quantized)  # shared experts are dense MLPs


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_plain_transformers_reload(runs, family):
    import transformers

    src, out, res = runs[family]
    ref = _log_probs(res.model, IDS)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _kl(ref, _log_probs(plain, IDS)) < RELOAD_KL
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert _kl(_log_probs(original, IDS), ref) > 1e-6  # the experts did change


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_frugal_reader_exact(runs, family):
    from frugal.load.model import load_model

    _, out, res = runs[family]
    own = load_model(out).model
    a, b = own.state_dict(), res.model.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_names_and_report(runs):
    _, out, res = runs["mixtral"]
    from conftest import read_tensors

    keys = set(read_tensors(out))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight_packed" in keys  # mixtral's own per-expert names
    assert not any(".gate_up_proj" in k for k in keys)
    report = json.loads((out / "frugal.json").read_text())["layers"]
    expert = report["model.layers.0.mlp.experts.3.gate_up_proj"]
    assert expert["statistics"] in ("own", "pooled") and expert["tokens"] >= 0
    assert "tokens" not in report["model.layers.0.self_attn.q_proj"]  # dense layers' reports unchanged
    tokens = sum(report[f"model.layers.0.mlp.experts.{e}.gate_up_proj"]["tokens"] for e in range(8))
    assert tokens == 8 * 64 * 2  # every calibration token routed to its top-2 experts


def test_expert_hessian_from_its_routed_tokens(tmp_path):
    """The Hessian of expert e's gate_up_proj is 2/n X_e^T X_e over exactly the tokens the router sent to e."""
    import transformers

    from frugal.compression.engine import block_hessians
    from frugal.compression.hooks import capture_block_inputs
    from frugal.load.blocks import block_linears, find_blocks

    model = transformers.AutoModelForCausalLM.from_pretrained(build_moe("mixtral", tmp_path / "m"), dtype=torch.float32)
    unfuse_experts(model)
    name, blocks = find_blocks(model)
    samples = torch.randint(3, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, blocks, samples)
    routed: list[tuple[torch.Tensor, torch.Tensor]] = []
    experts = blocks[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda _m, a: routed.append((a[0], a[1])))
    layers = block_linears(blocks[0], f"{name}.0", ())
    hessians, stats = block_hessians(layers, blocks[0], inputs.hidden, inputs.args, inputs.kwargs_per_block[0], "b0")
    handle.remove()
    x = torch.cat([h for h, _ in routed])
    top = torch.cat([t for _, t in routed])
    for e in range(experts.num_experts):
        x_e = x[(top == e).any(-1)].double()  # (n_e, hidden)
        key = f"{name}.0.mlp.experts.{e}.gate_up_proj"
        assert stats[key].tokens == x_e.shape[0]
        if stats[key].source == "own":
            torch.testing.assert_close(hessians[key], (2 / x_e.shape[0] * x_e.T @ x_e).float(), rtol=1e-5, atol=1e-6)


def test_fallback_rule(caplog):
    """Enough tokens: own Hessian; too few: pooled over the layer's experts; too few in all: none (RTN)."""
    from frugal.compression.statistics import choose_hessians
    from frugal.quant.gptq import Hessian

    class Fused(nn.Module):  # the transformers experts interface, 3 experts, in 8 -> 2*4 -> 8
        has_gate, is_transposed, num_experts, has_bias = True, False, 3, False

        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 8))
            self.down_proj = nn.Parameter(torch.randn(3, 8, 4))

    ex = ExpertLinears(Fused())
    layers = {f"m.{e}.gate_up_proj": ex.expert(e).gate_up_proj for e in range(3)}
    layers["dense"] = nn.Linear(8, 8)
    accs = {}
    for e, n in enumerate((20, 3, 0)):
        if n:
            accs[f"m.{e}.gate_up_proj"] = h = Hessian(8)
            h.add(torch.randn(n, 8))
    with caplog.at_level(logging.WARNING):
        chosen, stats = choose_hessians(layers, accs, {"m": ex})
    assert [stats[f"m.{e}.gate_up_proj"].source for e in range(3)] == ["own", "pooled", "pooled"]
    pooled = chosen["m.1.gate_up_proj"]
    torch.testing.assert_close(pooled.xtx, accs["m.0.gate_up_proj"].xtx + accs["m.1.gate_up_proj"].xtx)
    assert chosen["dense"] is None and stats["dense"].source == "none"  # no input reached it
    assert "pooled" in caplog.text and "dense" in caplog.text
    few = {"m.0.gate_up_proj": Hessian(8)}
    few["m.0.gate_up_proj"].add(torch.randn(5, 8))
    chosen, stats = choose_hessians({k: layers[k] for k in list(layers)[:3]}, few, {"m": ex})
    assert all(s.source == "none" and chosen[k] is None for k, s in stats.items())


def test_unreached_layer_is_rounded_without_hessian(tmp_path, caplog):
    """A linear whose weight the model uses without calling it gets RTN and a warning, not a KeyError."""
    from frugal.compression.engine import quantize_block
    from frugal.config import Recipe

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.bypassed = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.used(x) + x @ self.bypassed.weight.T

    torch.manual_seed(0)
    block = Block()
    w = block.bypassed.weight.detach().clone()
    recipe = Recipe.from_dict({"method": "gptq", "weights": {"bits": 4, "group_size": 32}})
    hidden = [torch.randn(1, 40, 32) for _ in range(2)]
    with caplog.at_level(logging.WARNING):
        _, reports, _ = quantize_block(block, "b", recipe, hidden, (), {}, {})
    rtn = Recipe.from_dict({"method": "rtn", "weights": {"bits": 4, "group_size": 32}})
    from frugal.compression import methods

    scale_dtype = recipe.scale_dtype_for(recipe.weights, w.dtype)
    expected = methods.get("rtn").quantize(w, None, rtn.weights, rtn, scale_dtype, "b.bypassed").weight
    assert torch.equal(block.bypassed.weight, expected.dequantize())
    assert reports["b.bypassed"].statistics == "none" and reports["b.bypassed"].gptq_loss is None
    assert reports["b.used"].statistics is None and reports["b.used"].gptq_loss is not None
    assert "b.bypassed" in caplog.text


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_streamed_moe_equals_in_memory(runs, tmp_path, family):
    """--stream reads each block's experts from the checkpoint's own tensors (per-expert w1/w3/w2, a shared
    expert, fused 3-D with biases) and writes them back under those names: the same tensors, config and
    per-expert statistics as the in-memory run."""
    import json

    from safetensors.torch import load_file

    from frugal.compression.stream import compress_streaming

    src, out, _ = runs[family]
    compress_streaming(src, RECIPE, tmp_path / "s", CALIB_TEXT)

    def tensors(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    mem, st = tensors(out), tensors(tmp_path / "s")
    assert set(st) == set(mem) and all(torch.equal(st[k], mem[k]) for k in mem)
    qc = [json.loads((d / "config.json").read_text())["quantization_config"] for d in (out, tmp_path / "s")]
    assert qc[0] == qc[1]
    layers = [json.loads((d / "frugal.json").read_text())["layers"] for d in (out, tmp_path / "s")]
    assert {n: (r.get("tokens"), r.get("statistics")) for n, r in layers[0].items()} == \
        {n: (r.get("tokens"), r.get("statistics")) for n, r in layers[1].items()}


def test_refusals(runs, tmp_path):
    src, out, res = runs["qwen3_moe"]
    with pytest.raises(FrugalError, match=r"--format onnx: MoE experts .* compressed-tensors, gguf only"):
        res.save(tmp_path / "g", fmt="onnx")
    with pytest.raises(FrugalError, match=r"--format gguf: architecture 'gpt_oss' is not supported"):
        runs["gpt_oss"][2].save(tmp_path / "h", fmt="gguf")
    assert not (tmp_path / "g").exists() and not (tmp_path / "h").exists()


def test_asymmetric_experts_refused_before_work(runs, tmp_path):
    """transformers cannot load asymmetric per-expert packed weights: refused in one line, before work."""
    src, _, _ = runs["mixtral"]
    asym = {**RECIPE, "weights": {"bits": 4, "group_size": 32, "symmetric": False}}
    with pytest.raises(FrugalError, match=r"block_sparse_moe.experts|mlp.experts: asymmetric grids on MoE experts"):
        frugal.compress(src, asym, CALIB_TEXT, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    ignored = frugal.compress(src, {**asym, "ignore": ["lm_head", "*.experts.*"]}, CALIB_TEXT)  # experts float: fine
    assert not any(".experts." in n for n in ignored.quantized)


def test_recommended_recipe_on_moe(tmp_path):
    """The main job's recipe (AWQ scales on the attention, GPTQ) on a MoE family, symmetric: the attention's
    norm takes AWQ's scales, every expert is quantized, plain transformers reloads it."""
    import transformers

    from frugal.config import recommended

    src = build_moe("qwen3_moe", tmp_path / "src")
    recipe = recommended()
    recipe["weights"]["symmetric"] = True
    recipe["weights"]["group_size"] = 32
    recipe["calibration"] = {"num_samples": 8, "seq_len": 64}
    c = frugal.compress(src, recipe, CALIB_TEXT)
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(c.model.state_dict()[norm].float(), original.state_dict()[norm])  # AWQ folded scales
    assert sum(".experts." in n for n in c.quantized) == 2 * 8 * 2
    c.save(tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert _kl(_log_probs(c.model, IDS), _log_probs(plain, IDS)) < RELOAD_KL


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_gguf_expert_tensors_bit_exact(tmp_path, family):
    """GGUF: each layer's experts stacked into llama.cpp's ffn_{gate,up,down}_exps (Q4_0 from the symmetric
    grid with float16 scales: exact), the router float32, the expert counts in the header."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    src = build_moe(family, tmp_path / "src")
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 4, "seq_len": 64},
              "storage": {"dtype": "float32", "scale_dtype": "float16"}, "seed": 0}
    c = frugal.compress(src, recipe, CALIB_TEXT)
    c.save(tmp_path / "g", fmt="gguf")
    reader = GGUFReader(tmp_path / "g" / "model.gguf")
    t = {x.name: x for x in reader.tensors}
    ex = expert_groups(c.model)
    group = next(g for g in ex if ".layers.1." in g)
    experts = ex[group]
    for e in (0, experts.num_experts - 1):
        gate_up = getattr(experts.expert(e), "gate_up_proj").weight
        inter = gate_up.shape[0] // 2
        for kind, want in (("gate", gate_up[:inter]), ("up", gate_up[inter:]), ("down", experts.expert(e).down_proj.weight)):
            tensor = t[f"blk.1.ffn_{kind}_exps.weight"]
            assert tensor.tensor_type.name == "Q4_0"
            got = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())  # (experts, out, in)
            assert torch.equal(got[e], want), (kind, e)
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.expert_count"].contents() == experts.num_experts
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    if family == "qwen2_moe":
        assert "blk.1.ffn_down_shexp.weight" in t and "blk.1.ffn_gate_inp_shexp.weight" in t


def test_gguf_refuses_routing_llama_cpp_does_not_compute(tmp_path):
    """llama.cpp's qwen3moe graph always renormalises the top-k weights: a config that does not is refused."""
    import transformers

    cls, kw = MOE_FAMILIES["qwen3_moe"]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**_MOE, **kw, "norm_topk_prob": False}))
    with pytest.raises(FrugalError, match="norm_topk_prob=False: llama.cpp's qwen3moe graph always uses True"):
        frugal.compress(model, {"method": "rtn", "weights": {"group_size": 32}}, formats=("gguf",))


def test_export_compressed_moe_to_gguf(runs, tmp_path):
    """`frugal export` of a MoE compressed-tensors directory: the per-expert integer weights come back under
    frugal's names (the same QuantizedWeights), and the GGUF holds them stacked."""
    from frugal.exporters.reload import load_compressed

    _, out, res = runs["mixtral"]
    back = load_compressed(out)
    assert set(back.quantized) == set(res.quantized)
    for name, qw in res.quantized.items():
        got = back.quantized[name]
        assert torch.equal(got.q, qw.q) and torch.equal(got.scale, qw.scale), name
    frugal.export(out, "gguf", tmp_path / "g")
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(tmp_path / "g" / "model.gguf").tensors}
    assert "blk.0.ffn_gate_exps.weight" in names and "blk.1.ffn_down_exps.weight" in names


def test_gguf_refuses_olmoe_with_grouped_query_attention():
    """llama.cpp's olmoe sizes attn_k_norm to the hidden width: GQA would not load there; refused."""
    import transformers

    cls, kw = MOE_FAMILIES["olmoe"]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**_MOE, **kw, "num_key_value_heads": 2}))
    with pytest.raises(FrugalError, match="olmoe takes no grouped-query attention"):
        frugal.compress(model, {"method": "rtn", "weights": {"group_size": 32}}, formats=("gguf",))


def test_analysis_covers_every_expert(runs):
    """`frugal analyze` measures each expert as compression rounds it (the experts unfused first)."""
    src, _, _ = runs["qwen3_moe"]
    analysis = frugal.analyze(src, samples=2, calib_len=64)
    names = {l.name for l in analysis.layers}
    assert {f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(8)} <= names
    assert not any(n.endswith("mlp.gate") for n in names)  # the router stays float
    # routed frequency: every token goes to top-k experts, so a layer's shares sum to k; dense layers have none
    from frugal.analysis.report import expert_table

    k = frugal.load_model(src).model.config.num_experts_per_tok
    for layer in (0, 1):
        shares = [l.routed for l in analysis.layers if l.name.startswith(f"model.layers.{layer}.mlp.experts.")
                  and l.name.endswith(".down_proj")]
        assert len(shares) == 8 and sum(shares) == pytest.approx(k, abs=1e-9), (layer, shares)
    assert all(l.routed is None for l in analysis.layers if ".experts." not in l.name)
    headers, rows = expert_table(analysis)
    assert [r[0] for r in rows] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
