"""End to end on tiny random models of six families: compress with GPTQ, save, reload the output in a
fresh process with plain `transformers.AutoModelForCausalLM.from_pretrained`, and check that the
reloaded model computes what frugal's in-memory compressed model computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CALIB_TEXT, EVAL_TEXT, FAMILIES, dir_digest

import frugal

GPTQ_RECIPE = {"method": "gptq", "weights": {"bits": 4, "group_size": 32},
               "calibration": {"num_samples": 4, "seq_len": 64}, "seed": 0}
RTN_ASYM_RECIPE = {"method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": False}, "seed": 0}

# The loader dequantizes (q - z) * s in float32 exactly as frugal does, so the reloaded model and
# frugal's in-memory model should agree to float rounding (observed: exactly 0).
RELOAD_ATOL = 1e-4
# plain from_pretrained computes in the stored bfloat16 (weights (q - z) * s rounded to it, bf16 matmuls):
# measured up to 1.2e-2 on these tiny models; frugal's own reader is exact (tests/export/test_storage.py)
RELOAD_ATOL_BF16 = 5e-2
# 4-bit g32 must visibly change the logits ...
MIN_CHANGE = 1e-3
# ... but stay close to the original. Observed ||dlogits|| / ||logits||: 0.08-0.11 for most
# families, 0.36 for Gemma 3 (random weights, tiny width); 0.5 leaves margin without hiding a break.
MAX_REL_ERROR = 0.5

CASES = [*FAMILIES, "llama-rtn-asym"]


@dataclass
class Run:
    family: str
    recipe: dict
    src: Path
    out: Path
    src_before: dict[str, str]
    src_after: dict[str, str]
    original: torch.Tensor  # logits of the float model
    compressed: torch.Tensor  # logits of frugal's in-memory compressed model
    quantized: list[str]  # names of the quantized layers in the result
    linears: list[str]  # every nn.Linear of the original model
    reloaded: torch.Tensor | None = None
    reload_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _test_ids() -> torch.Tensor:
    """BOS + 47 tokens of real text: longer than Gemma 3's sliding window (16)."""
    from transformers import AutoTokenizer

    from conftest import TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = tok(EVAL_TEXT.read_text()[:2000], add_special_tokens=False).input_ids[:47]
    return torch.tensor([[tok.bos_token_id, *ids]])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits.float()


def _compress_case(case: str, factory, root: Path, ids: torch.Tensor) -> Run:
    from transformers import AutoModelForCausalLM

    family = "llama" if case == "llama-rtn-asym" else case
    recipe = RTN_ASYM_RECIPE if case == "llama-rtn-asym" else GPTQ_RECIPE
    src = factory(family)
    before = dir_digest(src)
    original_model = AutoModelForCausalLM.from_pretrained(src).eval()
    linears = [n for n, m in original_model.named_modules() if isinstance(m, torch.nn.Linear)]
    original = _logits(original_model, ids)
    del original_model
    result = frugal.compress(src, recipe, calibration=CALIB_TEXT)
    out = root / f"out-{case}"
    result.save(out)
    return Run(family=family, recipe=recipe, src=src, out=out, src_before=before, src_after=dir_digest(src),
               original=original, compressed=_logits(result.model, ids), quantized=sorted(result.quantized),
               linears=linears)


RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys, traceback
    import torch, transformers
    transformers.logging.set_verbosity_error()
    jobs = json.load(open(sys.argv[1]))
    ids = torch.load(jobs["ids"])
    for out, dest in jobs["models"]:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits.float()
            torch.save({"logits": logits, "dtype": str(next(model.parameters()).dtype)}, dest)
        except Exception:
            torch.save({"error": traceback.format_exc()}, dest)
""")


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory) -> dict[str, Run | str]:
    """Every case compressed and saved in this process, then all outputs reloaded in ONE fresh
    process (transformers takes seconds to import). A case that fails holds its traceback."""
    root = tmp_path_factory.mktemp("families")
    work = root / "cwd"  # frugal runs here; nothing may appear in it
    work.mkdir()
    ids = _test_ids()
    results: dict[str, Run | str] = {}
    old_cwd = os.getcwd()
    os.chdir(work)
    try:
        for case in CASES:
            try:
                results[case] = _compress_case(case, tiny_model_factory, root, ids)
            except Exception:
                results[case] = traceback.format_exc()
    finally:
        os.chdir(old_cwd)
    results["_stray"] = sorted(os.listdir(work))  # type: ignore[assignment]

    torch.save(ids, root / "ids.pt")
    todo = {c: r for c, r in results.items() if isinstance(r, Run)}
    jobs = {"ids": str(root / "ids.pt"), "models": [[str(r.out), str(root / f"reload-{c}.pt")] for c, r in todo.items()]}
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "reload.py").write_text(RELOAD_SCRIPT)
    proc = subprocess.run([sys.executable, str(root / "reload.py"), str(root / "jobs.json")], cwd=root,
                          capture_output=True, text=True, timeout=600)
    for case, run in todo.items():
        dest = root / f"reload-{case}.pt"
        if not dest.is_file():
            run.reload_error = f"reload process exited {proc.returncode}:\n{proc.stderr[-3000:]}"
            continue
        got = torch.load(dest)
        run.reload_error = got.get("error")
        run.reloaded = got.get("logits")
        run.extra["dtype"] = got.get("dtype")
    return results


def _run(runs, case: str) -> Run:
    r = runs[case]
    if isinstance(r, str):
        pytest.fail(f"{case}: compress/save failed:\n{r}", pytrace=False)
    return r


@pytest.mark.parametrize("case", CASES)
def test_reload_in_fresh_process_matches(runs, case):
    run = _run(runs, case)
    assert run.reload_error is None, f"{case}: plain from_pretrained failed on {run.out}:\n{run.reload_error}"
    assert run.extra["dtype"] == "torch.bfloat16"  # config.json's dtype: recipe.storage.dtype
    diff = (run.reloaded - run.compressed).abs().max().item()
    assert diff <= RELOAD_ATOL_BF16, f"{case}: reloaded logits differ from frugal's in-memory model by {diff:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_compression_changes_model_but_stays_close(runs, case):
    run = _run(runs, case)
    change = (run.compressed - run.original).abs().max().item()
    rel = ((run.compressed - run.original).norm() / run.original.norm()).item()
    assert change > MIN_CHANGE, f"{case}: compression did not change the logits (max |d| = {change:.3g})"
    assert rel < MAX_REL_ERROR, f"{case}: relative logit error {rel:.3f} after 4-bit compression"


@pytest.mark.parametrize("case", CASES)
def test_quantized_every_linear_but_lm_head(runs, case):
    """Every linear layer is quantized except the ignored lm_head (fused qkv/gate_up in Phi-3,
    project_in/project_out outside the blocks in OPT), and the file holds them packed."""
    from safetensors import safe_open

    run = _run(runs, case)
    expected = sorted(n for n in run.linears if n != "lm_head")
    assert run.quantized == expected
    if run.family == "phi3":
        assert any(n.endswith("qkv_proj") for n in expected) and any(n.endswith("gate_up_proj") for n in expected)
    if run.family == "opt":
        assert all(n.startswith("model.decoder.") for n in expected)
        assert {"model.decoder.project_in", "model.decoder.project_out"} <= set(expected)
    with safe_open(str(run.out / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
    asym = run.recipe["weights"].get("symmetric") is False
    for name in expected:
        assert f"{name}.weight_packed" in keys and f"{name}.weight_scale" in keys, name
        assert f"{name}.weight" not in keys, f"{name}: float weight saved next to the packed one"
        assert (f"{name}.weight_zero_point" in keys) == asym, name
    qc = json.loads((run.out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    if asym:
        assert qc.get("dequantize") is True  # asymmetric configs load through dequantize-at-load


@pytest.mark.parametrize("case", CASES)
def test_frugal_json(runs, case):
    import compressed_tensors
    import transformers

    run = _run(runs, case)
    report = json.loads((run.out / "frugal.json").read_text())
    assert report["recipe"] == frugal.Recipe.from_dict(run.recipe).to_dict()
    assert report["seed"] == run.recipe["seed"]
    assert report["versions"] == {"frugal": frugal.__version__, "torch": torch.__version__.split("+")[0],
                                  "transformers": transformers.__version__,
                                  "compressed_tensors": compressed_tensors.__version__}
    assert sorted(report["layers"]) == run.quantized
    gptq = run.recipe["method"] == "gptq"
    for name, layer in report["layers"].items():
        assert layer["bits"] == 4 and layer["group_size"] == 32, name
        assert layer["symmetric"] == run.recipe["weights"].get("symmetric", True), name
        assert 0.0 < layer["weight_rel_error"] < 0.5, (name, layer)
        if gptq:
            assert 0.0 < layer["output_rel_error"] < 0.5, (name, layer)
            assert layer["gptq_loss"] >= 0.0 and 0.0 < layer["damp"] < 1.0, (name, layer)
        else:
            assert layer["output_rel_error"] is None, (name, layer)
        assert "seconds" not in layer  # timings would make the file differ between runs
    if gptq:
        assert report["calibration"] == {"source": CALIB_TEXT.name, "num_samples": 4, "seq_len": 64}


@pytest.mark.parametrize("case", CASES)
def test_source_directory_unchanged(runs, case):
    run = _run(runs, case)
    assert run.src_after == run.src_before


def test_nothing_written_to_working_directory(runs):
    assert runs["_stray"] == []


def test_same_seed_gives_identical_bytes(runs, tmp_path):
    """A second GPTQ run with the same seed writes byte-identical files."""
    run = _run(runs, "llama")
    frugal.compress(run.src, GPTQ_RECIPE, calibration=CALIB_TEXT).save(tmp_path / "again")
    first, second = dir_digest(run.out), dir_digest(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert "model.safetensors" in first and "frugal.json" in first
    differ = sorted(f for f in first if first[f] != second[f])
    assert differ == [], f"files differ between two runs with the same seed: {differ}"


def test_gemma3_blocks_get_their_own_masks(tiny_model_factory):
    """The sliding-window block and the full-attention block are called with different masks and
    rotary embeddings; the engine must record (and replay) each block's own arguments."""
    from transformers import AutoModelForCausalLM

    from frugal.load.blocks import find_blocks
    from frugal.compression.hooks import capture_block_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("gemma3")).eval()
    name, blocks = find_blocks(model)
    assert name == "model.layers"
    captured = capture_block_inputs(model, blocks, torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0)))
    assert len(captured.hidden) == 2
    kw0, kw1 = captured.kwargs_per_block
    m0, m1 = kw0.get("attention_mask"), kw1.get("attention_mask")
    assert m0 is not None, "the sliding-window block needs an explicit mask"
    assert m1 is None or not torch.equal(m0, m1)
    cos0, cos1 = kw0["position_embeddings"][0], kw1["position_embeddings"][0]
    assert not torch.equal(cos0, cos1), "local and global rotary embeddings should differ"


# -- the family table (frugal.families) ------------------------------------------------------------

def test_every_tested_family_has_a_record():
    """Each tiny-model family of conftest.FAMILIES (by its config's model_type) has a record, and the
    table is keyed by each record's own model_type."""
    import transformers

    from frugal.families import FAMILIES as RECORDS, family

    assert all(mt == r.model_type for mt, r in RECORDS.items())
    for name, (cls_name, _) in FAMILIES.items():
        mt = getattr(transformers, cls_name).model_type
        assert family(mt) is not None, f"conftest family {name!r} ({mt}) has no frugal.families record"
    assert family("somethingelse") is None and family(None) is None


def test_family_records_are_consistent():
    """Every record names a norm kind; the (1 + w) offset lives only in `norm`; rotation is either laid
    out (RMSNorm only) or refused with a reason; AWQ pairs are non-empty and name their linears."""
    from dataclasses import fields, is_dataclass

    from frugal.families import FAMILIES as RECORDS, FamilyRecord, supporting

    offsets = [f.name for f in fields(FamilyRecord) if "offset" in f.name or "plus_one" in f.name]
    assert offsets == []  # a record declares the norm offset once: FamilyRecord.norm.offset
    for mt, r in RECORDS.items():
        assert r.norm.kind in ("rms", "layer") and r.norm.offset in (0.0, 1.0), mt
        subs = [getattr(r, f.name) for f in fields(r) if is_dataclass(getattr(r, f.name))]
        for sub in subs:
            if sub is not r.norm:
                assert not [f.name for f in fields(sub) if "offset" in f.name or "plus_one" in f.name], (mt, sub)
        assert (r.rotation is None) != (r.rotation_refused == ""), f"{mt}: a rotation layout xor a refusal reason"
        if r.rotation is not None:
            assert r.norm.kind == "rms" and r.rotation.final_norm in r.final, mt
        if r.awq is not None:
            assert r.awq.pairs and all(p.prev and p.linears for p in r.awq.pairs), mt
        assert r.final and all(isinstance(role, str) and names for role, names in r.roles), mt
    assert supporting("awq") == [mt for mt, r in RECORDS.items() if r.awq is not None]
