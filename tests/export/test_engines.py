"""--engine: the output must run in the engine the user names. Each format lists its engines with the
limits of their kernels (vLLM 0.32's WNA16: 4 and 8 bits, 8-bit symmetric; vllm-cpu: 4-bit, 16-bit tensors);
a recipe an engine cannot run is refused before any work, and --engine alone picks the format it reads."""

from __future__ import annotations

import pytest

from frugal.config import Recipe
from frugal.errors import FrugalError
from frugal.exporters import check_engine, engine_keys, engines, format_for_engine


def _recipe(bits=4, symmetric=False, dtype="bfloat16", method="rtn") -> Recipe:
    return Recipe.from_dict({"method": method, "weights": {"bits": bits, "group_size": 64, "symmetric": symmetric},
                             "storage": {"dtype": dtype}})


@pytest.mark.parametrize("fmt,recipe,engine,why", [
    ("compressed-tensors", _recipe(bits=3), "vllm-cpu", "4-bit weights only"),
    ("compressed-tensors", _recipe(dtype="float32"), "vllm-cpu", "16-bit tensors"),
    ("compressed-tensors", _recipe(bits=3), "vllm", "4 and 8 bits"),
    ("compressed-tensors", _recipe(bits=8, symmetric=False), "vllm", "symmetric only"),
    ("gptq", _recipe(bits=8, symmetric=True), "vllm-cpu", "4-bit weights only"),
    ("gguf", _recipe(), "vllm", "it reads compressed-tensors, gptq"),
    ("compressed-tensors", _recipe(), "llama.cpp", "it reads gguf"),
])
def test_refusals_name_the_engine_and_the_reason(fmt, recipe, engine, why):
    with pytest.raises(FrugalError) as e:
        check_engine(fmt, recipe, engine)
    assert f"--engine {engine}" in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("fmt,recipe,engine", [
    ("compressed-tensors", _recipe(), "vllm-cpu"),  # the recommended W4 asymmetric bf16 output
    ("compressed-tensors", _recipe(bits=8, symmetric=True), "vllm"),
    ("gptq", _recipe(bits=3, symmetric=True), "vllm"),  # vLLM's GPTQ kernels take 3 bits
    ("openvino", _recipe(bits=3), "openvino"),
])
def test_runnable_outputs_pass(fmt, recipe, engine):
    check_engine(fmt, recipe, engine)
    assert not [e for e in engines(fmt, recipe) if e.key == engine and e.refusal]


def test_engine_picks_the_format_and_unknown_engines_are_listed():
    r = _recipe()
    assert format_for_engine("openvino", r) == "openvino"
    assert format_for_engine("llama.cpp", r) == "gguf"
    assert format_for_engine("vllm-cpu", r) == "compressed-tensors"
    assert {"transformers", "vllm", "vllm-cpu", "llama.cpp", "onnxruntime", "openvino"} <= set(engine_keys(r))
    with pytest.raises(FrugalError, match="--engine tensorrt: known engines are .*vllm-cpu"):
        format_for_engine("tensorrt", r)


def test_cli_refuses_before_work_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    """`frugal compress --engine vllm-cpu --bits 3` exits non-zero with one line before loading anything."""
    from frugal.cli.main import main

    out = tmp_path / "out"
    code = main(["compress", str(tiny_model_dir("llama")), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "--engine", "vllm-cpu", "--no-eval", "-o", str(out)])
    assert code != 0 and not out.exists()
    assert "--engine vllm-cpu" in capsys.readouterr().err


def test_cli_engine_picks_openvino(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("openvino")
    from frugal.cli.main import main

    out = tmp_path / "ov"
    assert main(["compress", str(tiny_model_dir("llama")), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--engine", "openvino", "--no-eval", "-o", str(out)]) == 0
    assert (out / "openvino_model.xml").exists()
    assert "Runs in (openvino)" in capsys.readouterr().out


def test_api_engine_refuses_before_work(tiny_model_dir):
    import frugal

    with pytest.raises(FrugalError, match="--engine vllm"):
        frugal.compress(tiny_model_dir("llama"), _recipe(bits=2), engine="vllm")


def test_vllm_gets_bfloat16_scales_others_float16():
    """The recommended recipe stores scales in float16; naming vLLM stores them in bfloat16, which it
    computes in (CLI preset and API alike)."""
    import argparse

    from frugal.api import _engine_recipe
    from frugal.cli.compress import recipe_from_args
    from frugal.cli.main import _parser as build_parser

    assert _engine_recipe("vllm-cpu").storage.scale_dtype == "bfloat16"
    assert _engine_recipe("openvino").storage.scale_dtype == "float16"
    a = build_parser().parse_args(["compress", "--engine", "vllm"])
    assert recipe_from_args(a).storage.scale_dtype == "bfloat16"
    a = build_parser().parse_args(["compress"])
    assert recipe_from_args(a).storage.scale_dtype == "float16"
    assert isinstance(a, argparse.Namespace)
