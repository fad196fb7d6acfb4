"""The Python API does what the `frugal` command does, with the same one-line errors: budgeted and
KL-limited mixed precision, streaming, analysis, export and evaluation (frugal.api)."""

from __future__ import annotations

import json

import pytest
import torch

import frugal
from conftest import CALIB_TEXT, EVAL_TEXT
from frugal.errors import FrugalError

RTN = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}
CANDIDATES = "int2g32,int3g32,int4g32,int8g32"


@pytest.fixture
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def test_lazy_names_are_the_api():
    import frugal.api

    for name in ("compress", "analyze", "export", "evaluate"):
        assert getattr(frugal, name) is getattr(frugal.api, name)


def test_budget_gives_the_overrides_the_cli_writes(llama, tmp_path):
    from frugal.cli.main import main

    assert main(["compress", str(llama), "--method", "rtn", "--budget", "3.8bpw", "--candidates", CANDIDATES,
                 "--no-eval", "-o", str(tmp_path / "cli")]) == 0
    res = frugal.compress(str(llama), {"method": "rtn"}, budget="3.8bpw", candidates=CANDIDATES.split(","),
                          out=tmp_path / "api")
    cli = json.loads((tmp_path / "cli" / "frugal.json").read_text())
    api = json.loads((tmp_path / "api" / "frugal.json").read_text())
    assert api["recipe"]["overrides"] == cli["recipe"]["overrides"] and cli["recipe"]["overrides"]
    assert api["mixed_precision"] == cli["mixed_precision"] == res.report.mixed
    assert res.report.mixed["bpw"] <= 3.8 and len(res.report.mixed["count"]) >= 2
    assert api["layers"] == cli["layers"]


def test_budget_on_a_loaded_model_leaves_it_alone(llama):
    from frugal.load.model import load_model

    loaded = load_model(llama)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = frugal.compress(loaded.model, {"method": "rtn"}, budget="3.8bpw", candidates=CANDIDATES,
                          tokenizer=loaded.tokenizer)
    assert res.report.recipe.overrides and res.model is not loaded.model
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_plan_budget_is_the_library_function(llama):
    from frugal.analysis.budget import plan_budget
    from frugal.load.model import load_model

    loaded = load_model(llama)
    recipe, plan = plan_budget(loaded.model, {"method": "rtn"}, budget="4.5bpw", tokenizer=loaded.tokenizer,
                               candidates=CANDIDATES)
    assert {o.match for o in recipe.overrides} == set(plan["choice"]) and plan["bpw"] <= 4.5


def test_max_kl_records_the_measured_kl(llama):
    res = frugal.compress(str(llama), {"method": "rtn"}, max_kl=1.0, candidates=CANDIDATES)
    mixed = res.report.mixed
    assert mixed["rounds"] == 1 and mixed["max_kl"] == 1.0 and 0 <= mixed["measured_kl"] <= 1.0


def test_mixed_precision_errors_match_the_cli(llama, tmp_path, capsys):
    from frugal.cli.main import main

    rc = main(["compress", str(llama), "--method", "rtn", "--max-kl", "1e-9", "--candidates", "int2g32,int3g32",
               "--no-eval", "-o", str(tmp_path / "x")])
    cli_err = capsys.readouterr().err.strip().splitlines()[-1]  # after the analysis's progress bars
    with pytest.raises(FrugalError) as e:
        frugal.compress(str(llama), {"method": "rtn"}, max_kl=1e-9, candidates="int2g32,int3g32")
    assert rc == 2 and cli_err == f"frugal: error: {e.value}" and "\n" not in str(e.value)
    with pytest.raises(FrugalError, match="give exactly one of --budget and --max-kl"):
        frugal.compress(str(llama), {"method": "rtn"}, budget="4bpw", max_kl=0.1)


def test_stream_writes_out_and_refuses_what_needs_memory(llama, tmp_path):
    out = frugal.compress(str(llama), RTN, stream=True, out=tmp_path / "st")
    assert out == tmp_path / "st" and (out / "frugal.json").is_file()
    frugal.compress(str(llama), RTN, out=tmp_path / "mem")
    st, mem = (json.loads((tmp_path / d / "frugal.json").read_text()) for d in ("st", "mem"))
    assert st["layers"] == mem["layers"]
    with pytest.raises(FrugalError, match=r"^--stream: --budget needs the whole model in memory$"):
        frugal.compress(str(llama), RTN, stream=True, budget="4bpw", out=tmp_path / "b")
    with pytest.raises(FrugalError, match=r"^--stream: --format gguf needs the whole model in memory$"):
        frugal.compress(str(llama), RTN, stream=True, formats=("gguf",), out=tmp_path / "g")
    with pytest.raises(FrugalError, match="out="):
        frugal.compress(str(llama), RTN, stream=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "g").exists()


def test_export_writes_gguf_and_gptq(llama, tmp_path):
    src = frugal.compress(str(llama), {**RTN, "weights": {**RTN["weights"], "scale_dtype": "float16"}},
                          out=tmp_path / "ct")
    assert src.report.mixed is None
    g = frugal.export(tmp_path / "ct", "gguf", tmp_path / "gguf")
    assert (g / "model.gguf").is_file() and "gguf" in json.loads((g / "frugal.json").read_text())
    q = frugal.export(tmp_path / "ct", "gptq", tmp_path / "gptq")
    assert (q / "config.json").is_file() and (q / "frugal.json").is_file()
    with pytest.raises(FrugalError, match="exists"):
        frugal.export(tmp_path / "ct", "gptq", tmp_path / "gptq")
    assert frugal.export(tmp_path / "ct", "gptq", tmp_path / "gptq", overwrite=True) == q
    with pytest.raises(FrugalError, match="known formats are"):
        frugal.export(tmp_path / "ct", "nope", tmp_path / "nope")


def test_analyze_returns_an_analysis_and_writes_its_files(llama, tmp_path):
    from frugal.analysis.analyze import Analysis

    a = frugal.analyze(str(llama), formats="int3g32,int4g32", measure=["int3g32"], samples=2, calib_len=32,
                       output=tmp_path / "an")
    assert isinstance(a, Analysis) and a.candidates == ["int3g32", "int4g32"] and a.calibration["method"] == "rtn"
    assert (tmp_path / "an" / "analysis.json").is_file() and (tmp_path / "an" / "heatmap.svg").is_file()
    # a calibration-free method rounds candidates to nearest, as the compression does
    h = frugal.analyze(str(llama), formats="int3g32,int4g32", measure="int3g32", samples=2, calib_len=32,
                       method="hqq")
    assert h.calibration["method"] == "rtn"
    g = frugal.analyze(str(llama), formats="int3g32,int4g32", measure="int3g32", samples=2, calib_len=32,
                       method="gptq")
    assert g.calibration["method"] == "gptq"
    with pytest.raises(FrugalError, match="known methods are"):
        frugal.analyze(str(llama), formats="int3g32", measure="int3g32", samples=2, calib_len=32, method="nope")


def test_evaluate_keeps_the_metrics_signature_and_runs_the_suite(llama, tmp_path):
    from frugal.evaluation.metrics import EvalResult, Protocol
    from frugal.load.model import load_model

    loaded = load_model(llama)
    protocol = Protocol(text=str(EVAL_TEXT), seq_len=64, max_tokens=256)
    (r,) = frugal.evaluate({"m": loaded.model}, loaded.tokenizer, protocol)
    assert isinstance(r, EvalResult) and r.name == "m" and r.tokens > 0
    results = frugal.evaluate([str(llama)], ref=str(llama), text=EVAL_TEXT, seq_len=64, eval_tokens=256,
                              output=tmp_path / "ev", json_out=tmp_path / "r.json")
    assert [m["is_reference"] for m in results["models"]] == [True, False]
    assert results["models"][1]["perplexity"] == pytest.approx(r.ppl)
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert (tmp_path / "ev" / "report.html").is_file() and (tmp_path / "ev" / "results.json").is_file()
    with pytest.raises(FrugalError, match=r"^--tasks nope: known tasks are piqa, hellaswag$"):
        frugal.evaluate(str(llama), tasks="nope", text=EVAL_TEXT)


def test_cli_choices_come_from_the_registries():
    from frugal.cli.main import _parser
    from frugal.compression import methods
    from frugal.exporters import FORMATS

    sub = next(a for a in _parser()._actions if a.dest == "cmd").choices
    opts = {cmd: {a.dest: a for a in sub[cmd]._actions} for cmd in ("compress", "analyze", "export")}
    assert list(opts["compress"]["method"].choices) == list(methods.names()) == list(opts["analyze"]["method"].choices)
    assert opts["compress"]["method"].help == methods.help_text()
    assert list(opts["compress"]["format"].choices) == list(FORMATS) == list(opts["export"]["format"].choices)


def test_gptq_budget_takes_hessians_from_the_calibration(llama):
    from frugal.analysis.budget import analysis_formats, analysis_method
    from frugal.config import Recipe

    assert analysis_method("gptq") == "gptq" and analysis_method("rtn") == analysis_method("hqq") == "rtn"
    assert len(analysis_formats(Recipe(method="gptq"))) < len(analysis_formats(Recipe(method="rtn")))
    res = frugal.compress(str(llama), {"method": "gptq", "calibration": {"num_samples": 4, "seq_len": 32}},
                          CALIB_TEXT, budget="4.5bpw", candidates=CANDIDATES)
    assert res.report.mixed["bpw"] <= 4.5
