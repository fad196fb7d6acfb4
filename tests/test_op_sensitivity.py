"""frugal.analysis.ops: per-operator float rounding on tiny llama / qwen3 / gemma3 models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from frugal.errors import FrugalError
from frugal.analysis.ops import CLASSES, OpRounding, op_sensitivity, round_to_format, row_rel_error

FAMILIES = ("llama", "qwen3", "gemma3")
FORMATS = ("float16", "bfloat16", "fp8_e4m3")
# ops per block in one forward: 4 projections + Q.K^T + softmax + P.V; gate/up/down; act(gate) and
# act(gate) * up; the block's norms (+ per-head q/k norms in qwen3 / gemma3, + post-sublayer norms
# in gemma3); two residual adds.
EXPECTED = {
    "llama": dict(attn_linear=4, scores=1, softmax=1, attn_output=1, mlp_linear=3, mlp_act=2, norm=2, residual=2),
    "qwen3": dict(attn_linear=4, scores=1, softmax=1, attn_output=1, mlp_linear=3, mlp_act=2, norm=4, residual=2),
    "gemma3": dict(attn_linear=4, scores=1, softmax=1, attn_output=1, mlp_linear=3, mlp_act=2, norm=6, residual=2),
}


@pytest.fixture(scope="module")
def loaded(tiny_model_factory):
    """family -> (model, (2, 48) calibration tokens), built once per module."""
    from frugal.calibrate import from_text
    from frugal.load.model import load_model

    from conftest import CALIB_TEXT

    out = {}
    for fam in FAMILIES:
        m = load_model(tiny_model_factory(fam))
        out[fam] = (m.model, from_text(m.tokenizer, CALIB_TEXT, 2, 48, seed=0))
    return out


@pytest.fixture(scope="module")
def results(loaded):
    """family -> op_sensitivity over FORMATS (every class)."""
    return {fam: op_sensitivity(model, x, FORMATS) for fam, (model, x) in loaded.items()}


def _eager_logits(model, x):
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(x, use_cache=False).logits
    finally:
        model.set_attn_implementation(attn)


# ---------------------------------------------------------------------------------------------
# round_to_format (pure)


def test_round_to_format_matches_frugal_floats():
    from frugal.quant.floats import fake_quantize

    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    assert round_to_format(x, "float32") is x
    assert torch.equal(round_to_format(x, "fp16"), x.half().float())
    assert torch.equal(round_to_format(x, "bf16"), x.bfloat16().float())
    assert torch.equal(round_to_format(x, "fp8_e4m3"), fake_quantize(x.reshape(15, 64), "fp8_e4m3").reshape(x.shape))
    # a last dim of 48 is one block of 32 plus a partial block of 16, scaled on its own
    y = x[..., :48]
    r = round_to_format(y, "mxfp4").reshape(15, 48)
    rows = y.reshape(15, 48)
    assert torch.equal(r[:, :32], fake_quantize(rows[:, :32].contiguous(), "mxfp4"))
    padded = torch.nn.functional.pad(rows[:, 32:], (0, 16))
    assert torch.equal(r[:, 32:], fake_quantize(padded, "mxfp4")[:, :16])


def test_round_to_format_error_bounds():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 10
    rel = {f: float((round_to_format(x, f) - x).norm() / x.norm()) for f in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")}
    # round to nearest: |r - x| <= 2^-(mantissa bits + 1) |x| element-wise for normal values
    assert ((round_to_format(x, "fp16") - x).abs() <= 2**-11 * x.abs()).all()
    assert ((round_to_format(x, "bf16") - x).abs() <= 2**-8 * x.abs()).all()
    assert 0 < rel["fp16"] < rel["bf16"] < rel["fp8_e4m3"] < rel["fp8_e5m2"] < 2**-3
    with pytest.raises(FrugalError, match="fp7"):
        round_to_format(x, "fp7")


def test_row_rel_error_weighs_rows_equally():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [1000.0, 0.0]])
    r = torch.tensor([[3.0, 4.5], [1.0, 0.0], [float("inf"), 0.0], [1000.0, 0.0]])
    # row 0: 0.5^2 / 25; row 1 (zero) and row 2 (overflow) left out; row 3 exact but counted
    assert row_rel_error(r, y) == (pytest.approx(0.01), 2, 1)


# ---------------------------------------------------------------------------------------------
# Classification


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_per_block(results, family):
    counts = results[family].counts
    assert counts == {c: [EXPECTED[family][c]] * 2 for c in CLASSES}
    for r in results[family].rows:  # every rounded run classified the same ops
        assert r.ops_per_block == EXPECTED[family][r.cls]


@pytest.mark.parametrize("family", ("llama", "gemma3"))
def test_float32_rounding_is_exact(loaded, family):
    model, x = loaded[family]
    ref = _eager_logits(model, x)
    with OpRounding(model, CLASSES, "float32") as r, torch.no_grad():
        got = model(x, use_cache=False).logits
    assert torch.equal(got, ref)
    assert r.counts[0] == EXPECTED[family]  # one forward (of a batch of 2)
    res = op_sensitivity(model, x, formats=("float32",))
    for row in res.rows:
        assert (row.kl, row.top1, row.final_rel_error, row.local_rel_error) == (0.0, 1.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Damage


@pytest.mark.parametrize("family", FAMILIES)
def test_rounding_one_class_changes_the_output(results, family):
    for cls in CLASSES:
        row = results[family].row(cls, "fp8_e4m3")
        assert 0 < row.kl < 0.1 and math.isfinite(row.kl), (cls, row)
        assert 0 < row.local_rel_error < 2**-3 and 0 < row.final_rel_error < 1, (cls, row)
        assert row.amplification == pytest.approx(row.final_rel_error / row.local_rel_error)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_error_is_the_unit_roundoff(results, family):
    """Each rounded op output is within half an ulp: ||r - y|| <= u ||y|| (fp16: 2^-11, bf16: 2^-8)."""
    for cls in CLASSES:
        fp16, bf16 = results[family].row(cls, "float16"), results[family].row(cls, "bfloat16")
        assert 0 < fp16.local_rel_error <= 2**-11 and fp16.overflows == 0, cls
        assert 4 * fp16.local_rel_error < bf16.local_rel_error <= 2**-8, cls


@pytest.mark.parametrize("family", FAMILIES)
def test_damage_grows_with_coarser_formats(results, family):
    res = results[family]
    for cls in CLASSES:  # the final hidden state: fp8_e4m3 > bf16 > fp16 for every class
        e = [res.row(cls, f).final_rel_error for f in ("fp8_e4m3", "bfloat16", "float16")]
        assert e[0] > e[1] > e[2] > 0, (cls, e)
    for cls in ("softmax", "residual"):  # KL too
        k = [res.row(cls, f).kl for f in ("fp8_e4m3", "bfloat16", "float16")]
        assert k[0] >= k[1] >= k[2] > 0, (cls, k)


# ---------------------------------------------------------------------------------------------
# Per block, rendering, and leaving the model as it was


def test_per_block_matches_a_full_forward(loaded):
    """Per-block KL (cached block inputs, tail re-run) equals a full forward with only that block rounded."""
    import torch.nn.functional as F

    model, x = loaded["llama"]
    res = op_sensitivity(model, x, formats=("bfloat16", "fp8_e4m3"), classes=["residual", "softmax"],
                         per_block=True, per_block_samples=1)
    assert res.per_block_format == "fp8_e4m3"  # the worst of the two
    ref = F.log_softmax(_eager_logits(model, x[:1])[0].double(), -1)
    for cls in ("residual", "softmax"):
        for b in range(2):
            with OpRounding(model, [cls], "fp8_e4m3", block=b), torch.no_grad():
                lp = F.log_softmax(model(x[:1], use_cache=False).logits[0].double(), -1)
            kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
            assert res.per_block[cls][b] == pytest.approx(kl, rel=1e-2, abs=1e-9), (cls, b)
            assert res.per_block[cls][b] > 0
    md = res.per_block_table().splitlines()
    assert len(md) == 4 and md[0] == "| block | residual | softmax |"


def test_rendering(results):
    res = results["llama"]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["counts"]["norm"] == [2, 2] and len(d["rows"]) == len(CLASSES) * len(FORMATS)
    lines = res.table().splitlines()
    assert len(lines) == 2 + len(res.rows) and lines[2].startswith("| attn_linear | float16 | 4 |")


def test_model_unchanged_afterwards(loaded):
    model, x = loaded["qwen3"]
    attn = model.config._attn_implementation
    with torch.no_grad():
        before = model(x, use_cache=False).logits
    op_sensitivity(model, x[:1], formats=("fp8_e4m3",), classes=["softmax", "norm"], per_block=True)
    with pytest.raises(RuntimeError, match="boom"):
        with OpRounding(model, CLASSES, "bfloat16"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == attn
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    with torch.no_grad():
        after = model(x, use_cache=False).logits
    assert torch.equal(before, after)


def test_unknown_class_and_format(loaded):
    model, x = loaded["llama"]
    with pytest.raises(FrugalError, match="attention_scores"):
        op_sensitivity(model, x, classes=["attention_scores"])
    with pytest.raises(FrugalError, match="fp7"):
        op_sensitivity(model, x, formats=("fp7",))


def test_cli_analyze_ops_writes_json_and_table(tiny_model_factory, tmp_path, capsys):
    import frugal.cli.main as cli

    out = tmp_path / "ops"
    rc = cli.main(["analyze", str(tiny_model_factory("llama")), "--ops", "--ops-formats", "bfloat16,fp8_e4m3",
                   "--samples", "2", "--calib-len", "32", "-o", str(out)])
    assert rc == 0
    data = json.loads((out / "op_sensitivity.json").read_text())
    rows = {(r["cls"], r["fmt"]): r for r in data["rows"]}
    assert set(f for _, f in rows) == {"bfloat16", "fp8_e4m3"} and {c for c, _ in rows} == set(CLASSES)
    assert all(r["kl"] > 0 and math.isfinite(r["kl"]) for r in rows.values())
    assert "residual" in capsys.readouterr().out
    assert cli.main(["analyze", str(tiny_model_factory("llama")), "--ops", "--ops-formats", "fp3"]) == 2
