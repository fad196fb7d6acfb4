"""Offline rotations (frugal.compression.transforms.rotation): the maths on tiny tensors, then exactness on tiny models of every
supported family, refusals, incoherence, RTN error, determinism and a compressed-tensors round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model

import frugal
from frugal.errors import FrugalError
from frugal.families import family as family_record
from frugal.compression.transforms.rotation import (RotationOptions, check, fuse_norm, hadamard, incoherence, random_hadamard,
                           random_orthogonal, rotate_head_cols, rotate_head_rows, rotate_model, rotate_reader,
                           rotate_writer)

HAD = RotationOptions(kind="hadamard", seed=0)
# Observed max |dlogits| / max |logits| after rotation in float32: 4e-7 .. 7e-7.
EXACT_REL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- maths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 72, 576, 896])
def test_hadamard_is_hadamard(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_no_hadamard_and_fallback_is_orthogonal():
    assert hadamard(3) is None and hadamard(6) is None and hadamard(18) is None
    for n in (18, 576, 64):
        for r in (random_hadamard(n, _gen()), random_orthogonal(n, _gen())):
            assert (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    r = random_hadamard(576, _gen())
    assert torch.allclose(r.abs(), torch.full_like(r, 1 / 24))  # a true Hadamard: every entry ±1/sqrt(576)


def test_reader_writer_and_norm_fusion_are_exact():
    g = _gen(1)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)  # residual rows
    gamma = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    w_in, w_out = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    b_out = torch.randn(8, generator=g, dtype=torch.float64)
    r = random_orthogonal(8, g)
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    y = (rms(x) * gamma) @ w_in.T
    y_rot = rms(x @ r) @ rotate_reader(fuse_norm(w_in, gamma), r).T
    assert torch.allclose(y, y_rot, atol=1e-12)
    z = torch.randn(5, 6, generator=g, dtype=torch.float64)
    out_rot = z @ rotate_writer(w_out, r).T + rotate_writer(b_out, r)
    assert torch.allclose((z @ w_out.T + b_out) @ r, out_rot, atol=1e-12)


def test_per_head_value_rotation_is_exact_with_gqa():
    """4 query heads share 2 KV heads; a fixed attention pattern per query head mixes positions."""
    g, d, heads, kv, t = _gen(2), 4, 4, 2, 5
    x = torch.randn(t, 8, generator=g, dtype=torch.float64)
    w_v, b_v = torch.randn(kv * d, 8, generator=g, dtype=torch.float64), torch.randn(kv * d, generator=g, dtype=torch.float64)
    w_o = torch.randn(8, heads * d, generator=g, dtype=torch.float64)
    attn = torch.softmax(torch.randn(heads, t, t, generator=g, dtype=torch.float64), -1)
    r2 = random_hadamard(d, g)

    def attention_out(wv, bv, wo):
        v = (x @ wv.T + bv).reshape(t, kv, d)  # (T, kv, d)
        a = torch.stack([attn[h] @ v[:, h // (heads // kv)] for h in range(heads)], 1)  # (T, heads, d)
        return a.reshape(t, heads * d) @ wo.T

    ref = attention_out(w_v, b_v, w_o)
    rot = attention_out(rotate_head_rows(w_v, r2), rotate_head_rows(b_v, r2), rotate_head_cols(w_o, r2))
    assert torch.allclose(ref, rot, atol=1e-12)


# -- tiny models ------------------------------------------------------------------------------------

def _tiny(family: str, tmp_path, **overrides):
    import transformers

    transformers.logging.set_verbosity_error()
    if family == "gemma":  # Gemma (1): (1 + w) norms, tied head, embedding scaled by sqrt(hidden)
        cfg = transformers.GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()
    d = build_tiny_model(family, tmp_path / family, **overrides)
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


@torch.no_grad()
def _randomise_norms_and_biases(model, seed: int = 1) -> None:
    """Norm weights away from 1 (so fusion is exercised) and non-zero biases."""
    g = _gen(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ids(n: int = 2, t: int = 40) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=_gen(3))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids, use_cache=False).logits


CASES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": {}, "gemma": {},
    "llama-tied-bias": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_float_model_is_the_same_function(case, kind, tmp_path):
    family = case.split("-")[0]
    model = _tiny(family, tmp_path, **CASES[case])
    _randomise_norms_and_biases(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (case in ("gemma", "llama-tied-bias"))
    ids = _ids()
    ref = _logits(model, ids)
    rotate_model(model, RotationOptions(kind=kind, seed=0))
    out = _logits(model, ids)
    assert (out - ref).abs().max() / ref.abs().max() < EXACT_REL
    offset = family_record(model.config.model_type).norm.offset
    norms = [p for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    assert len(norms) == 2 * 2 + 1 and all(torch.all(p == 1.0 - offset) for p in norms)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False or not tied


@pytest.mark.parametrize("family,why", [("gemma3", "post-attention/post-feedforward norms"),
                                        ("opt", "LayerNorm subtracts the mean")])
def test_refused_families(family, why, tmp_path):
    model = _tiny(family, tmp_path)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(FrugalError, match=why) as e:
        rotate_model(model, HAD)
    assert family in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    model.config.model_type = "somethingelse"
    with pytest.raises(FrugalError, match="'somethingelse' has no rotation table"):
        check(model)


def test_kind_none_and_bad_kind(tmp_path):
    model = _tiny("llama", tmp_path)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert rotate_model(model, RotationOptions(kind="none")) == {"kind": "none"}
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(FrugalError, match="rotation.kind='givens'"):
        rotate_model(model, RotationOptions(kind="givens"))


@torch.no_grad()
def _plant_outliers(model, factor: float = 8.0, head_scale: float = 20.0) -> None:
    """Two residual channels 8x larger in every block linear's inputs (as LLM outlier channels), and a
    sharper head so the output distribution is far from uniform."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            mod.weight[:, [3, 17]] *= factor
    model.lm_head.weight.mul_(head_scale)


def _block_incoherence(model) -> float:
    return float(torch.cat([incoherence(m.weight) for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and ".layers." in n]).mean())


@pytest.fixture
def outlier_llama(tmp_path):
    model = _tiny("llama", tmp_path)
    _randomise_norms_and_biases(model)
    _plant_outliers(model)
    return model


def _kl(ref_logits, logits) -> float:
    p, q = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_rotation_removes_outliers_and_lowers_rtn_error(outlier_llama):
    rotated = copy.deepcopy(outlier_llama)
    rotate_model(rotated, HAD)
    # observed mean max|w|/rms per row: 5.34 planted, 2.89 rotated (a Gaussian row of 64: ~2.6)
    assert _block_incoherence(rotated) < 0.6 * _block_incoherence(outlier_llama)
    ids = _ids(4, 64)
    ref = _logits(outlier_llama, ids)
    for bits in (4, 3):  # observed KL ratio rotated / plain: 0.52 (W4), 0.47 (W3)
        recipe = {"method": "rtn", "weights": {"bits": bits, "group_size": 32}}
        plain = _kl(ref, _logits(frugal.compress(outlier_llama, recipe).model, ids))
        rot = _kl(ref, _logits(frugal.compress(rotated, recipe).model, ids))
        assert rot < 0.7 * plain, (bits, rot, plain)


def test_deterministic_for_a_seed(tmp_path):
    base = _tiny("qwen3", tmp_path)
    _randomise_norms_and_biases(base)
    states = []
    for seed in (5, 5, 6):
        m = copy.deepcopy(base)
        rotate_model(m, RotationOptions(kind="hadamard", seed=seed))
        states.append({n: p.numpy().tobytes() for n, p in m.state_dict().items()})
    assert states[0] == states[1]
    assert states[0]["model.layers.0.self_attn.q_proj.weight"] != states[2]["model.layers.0.self_attn.q_proj.weight"]


def test_rotated_model_saves_and_reloads(tmp_path):
    import transformers

    model = _tiny("llama", tmp_path, tie_word_embeddings=True)
    _randomise_norms_and_biases(model)
    ids = _ids()
    ref = _logits(model, ids)
    rotate_model(model, HAD)
    res = frugal.compress(model, {"method": "rtn", "weights": {"bits": 4, "group_size": 32}})
    res.save(tmp_path / "out")
    from frugal.load.model import load_model

    back = load_model(tmp_path / "out").model.eval()
    assert back.config.tie_word_embeddings is False
    assert not torch.equal(back.lm_head.weight, back.model.embed_tokens.weight)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())  # stored in bf16
    assert all(torch.all(p == 1.0) for n, p in back.named_parameters() if "norm" in n)
    got = _logits(back, ids)
    assert (got - _logits(res.model, ids)).abs().max() < 1e-4
    assert 1e-3 < (got - ref).abs().max() / ref.abs().max() < 0.5  # quantized, not broken
    assert math.isfinite(float(got.sum()))


def test_recipe_rotation_through_the_cli(tiny_model_dir, tmp_path):
    """`frugal compress --rotate hadamard`: the recipe records the rotation, the saved model reloads with
    the compressed model's logits, and streaming (which never holds the whole model) refuses it."""
    import json

    import frugal.cli.main as cli
    from frugal.load.model import load_model

    src = tiny_model_dir("llama")
    out = tmp_path / "rot"
    args = ["compress", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "--rotate", "hadamard",
            "--no-eval"]
    assert cli.main(args + ["-o", str(out)]) == 0
    meta = json.loads((out / "frugal.json").read_text())
    assert meta["recipe"]["rotation"]["kind"] == "hadamard"
    import frugal

    c = frugal.compress(src, meta["recipe"])
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_model(out).model(ids).logits, c.model(ids).logits, atol=1e-4)
    assert cli.main(args + ["--stream", "-o", str(tmp_path / "st")]) == 2
