"""The quantizer registry's seam: a new method is one module plus one registry line, and then every stage
takes it (recipe, CLI help, pre-flight, in-memory and streaming engines) with no other file changed."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

SIGN = {"method": "sign", "weights": {"bits": 2, "group_size": 32}}


@pytest.fixture
def sign_method(monkeypatch):
    """Register the toy method for one test (the registry is restored afterwards)."""
    import toy_sign
    from frugal.compression import methods

    monkeypatch.setattr(methods.REGISTRY, "_records", dict(methods.REGISTRY.records()))
    methods.register(toy_sign.METHOD)  # the one registry line
    return toy_sign.METHOD


def test_unknown_method_is_refused_with_the_registered_names():
    from frugal.config import Recipe
    from frugal.errors import FrugalError

    with pytest.raises(FrugalError, match=r"recipe.method='sign': known methods are gptq, rtn, hqq"):
        Recipe.from_dict(SIGN)


def test_recipe_accepts_it_and_reads_its_flags(sign_method):
    from frugal.config import Recipe
    from frugal.errors import FrugalError

    r = Recipe.from_dict(SIGN)
    assert r.method == "sign" and not r.needs_calibration
    assert Recipe.from_dict(r.to_dict()) == r  # round-trips like any recipe
    with pytest.raises(FrugalError, match="recipe.method=sign: a toy quantizer of integer grids only"):
        Recipe.from_dict({**SIGN, "gguf_type": "Q4_0"})


def test_cli_help_lists_it(sign_method):
    import frugal.cli.main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    assert "sign" in out.getvalue() and "toy: sign of each weight" in " ".join(out.getvalue().split())


def test_preflight_uses_its_cost_model(sign_method, tiny_model_dir):
    from frugal.compression.preflight import estimate
    from frugal.config import Recipe

    src = tiny_model_dir("llama")
    sign = estimate(src, Recipe.from_dict(SIGN))
    rtn = estimate(src, Recipe.from_dict({**SIGN, "method": "rtn"}))
    widest = 128 * 64  # the tiny llama's largest layer (intermediate 128 x hidden 64)
    assert sign.peak_ram_bytes - rtn.peak_ram_bytes == (7 - 3) * widest * 4


def _tensors(directory):
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_both_engines_run_it_and_agree(sign_method, tiny_model_dir, tmp_path):
    import frugal
    from frugal.compression.stream import compress_streaming

    src = tiny_model_dir("llama")
    result = frugal.compress(str(src), SIGN)
    w = result.model.model.layers[0].mlp.down_proj.weight  # (64, 128): groups of 32
    qw = result.quantized["model.layers.0.mlp.down_proj"]
    assert set(qw.q.unique().tolist()) == {-1, 1}
    assert torch.equal(w.abs().reshape(64, 4, 32).amax(2), w.abs().reshape(64, 4, 32).amin(2))  # one |value| per group
    result.save(tmp_path / "mem")
    out = compress_streaming(str(src), SIGN, tmp_path / "stream")
    a, b = _tensors(tmp_path / "mem"), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "mem" / "frugal.json").read_bytes() == (out / "frugal.json").read_bytes()
