"""`frugal eval A B --ref R`: same tokens for everyone, block errors, speed, generations, results.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import CALIB_TEXT, EVAL_TEXT


@pytest.fixture(scope="module")
def pair(tiny_model_factory, tmp_path_factory):
    """A tiny float model and its GPTQ W4 g32 compression saved with frugal.json."""
    import frugal

    src = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("q") / "w4"
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 4, "seq_len": 64}}
    frugal.compress(src, recipe, str(CALIB_TEXT)).save(out)
    return src, out


def test_block_errors_zero_for_the_reference_and_positive_for_a_compressed_model(pair):
    from frugal.evaluation.blockerror import block_errors
    from frugal.load.model import load_model

    src, out = pair
    ref, comp = load_model(src).model, load_model(out).model
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    same = block_errors(ref, ref, ids)
    assert [b["block"] for b in same] == ["model.layers.0", "model.layers.1"]
    assert all(b["rel_error"] == 0.0 for b in same)
    errs = block_errors(comp, ref, ids)
    assert all(0.001 < b["rel_error"] < 0.5 for b in errs), errs


def test_suite_results_follow_the_schema(pair):
    from frugal.evaluation.suite import SuiteOptions, run_suite
    from frugal.evaluation.metrics import Protocol

    src, out = pair
    opts = SuiteOptions(protocol=Protocol(text=str(EVAL_TEXT), seq_len=64, max_tokens=256), generate=True, max_new_tokens=4)
    res = run_suite([str(out)], str(src), opts)
    assert res["schema_version"] == 1 and res["reference"] == str(src)
    ref, comp = res["models"]
    assert ref["is_reference"] and ref["kl"] is None and "block_errors" not in ref
    assert not comp["is_reference"] and comp["kl"] > 0 and 0 < comp["top1"] <= 1
    assert res["protocol"]["perplexity"]["scored_tokens"] == 4 * 63  # no BOS by default: first token unscored
    assert comp["size_bytes"] < ref["size_bytes"]
    # 4-bit codes plus one float32 scale per 32 weights = 5 bits per weight
    assert comp["bits_per_weight"] == pytest.approx(4 + 16 / 32)  # bfloat16 scales (recipe.storage)
    assert set(comp["layer_errors"]) and all("output_rel_error" in v for v in comp["layer_errors"].values())
    assert len(comp["block_errors"]) == 2
    assert len(comp["generations"]) == 4 and all(isinstance(g["text"], str) for g in comp["generations"])
    json.dumps(res)  # serialisable as is


def test_speed_in_its_own_process(pair):
    """Speed of one model in a child; its peak RSS is its own, not that of this process, which holds
    500 MB more while the child runs (ru_maxrss would report at least this process's resident size)."""
    from test_memory import BALLAST, ballast, resident_bytes

    src, _ = pair
    held = ballast()
    parent = resident_bytes()
    proc = subprocess.run([sys.executable, "-m", "frugal.evaluation.speed", str(src), "--repeats", "2", "--prompt-tokens", "16",
                           "--new-tokens", "4"], capture_output=True, text=True, check=True)
    del held
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s["prefill_tok_s"]["min"] <= s["prefill_tok_s"]["median"] <= s["prefill_tok_s"]["max"]
    assert s["decode_tok_s"]["median"] > 0 and s["ttft_s"]["median"] > 0
    assert 50e6 < s["peak_rss_bytes"] < parent - BALLAST // 2, (s["peak_rss_bytes"], parent)


def test_perplexity_equals_a_plain_reference_computation(pair):
    """frugal's perplexity equals exp(mean of transformers' own shifted cross-entropy) per window."""
    import math

    from frugal.evaluation.metrics import Protocol, evaluate, windows
    from frugal.load.model import load_model

    src, _ = pair
    lm = load_model(src)
    protocol = Protocol(text=str(EVAL_TEXT), seq_len=64, max_tokens=640)
    (ours,) = evaluate({"m": lm.model}, lm.tokenizer, protocol)
    wins, bos = windows(lm.tokenizer, protocol)
    assert bos is None
    with torch.no_grad():
        losses = [lm.model(w[None], labels=w[None]).loss.item() for w in wins]  # equal-length windows
    plain = math.exp(sum(losses) / len(losses))
    assert f"{ours.ppl:.4g}" == f"{plain:.4g}"
    assert ours.tokens == 10 * 63


@pytest.mark.parametrize("dtype,sum_dtype", [(torch.float32, None), (torch.float64, None), (torch.float64, torch.float64)])
def test_kl_top1_is_bitwise_the_formulas_it_replaced(dtype, sum_dtype):
    """frugal.evaluation.divergence: the same float ops, in the same order, as the copies in
    evaluation.metrics, analysis.analyze/mixed (float32, .sum()) and analysis.ops (float64 accumulator)."""
    import torch.nn.functional as F

    from frugal.evaluation.divergence import kl_sum, kl_top1

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 512, generator=g, dtype=torch.float64)
    ref = F.log_softmax(logits.to(dtype), dim=-1)
    lp = F.log_softmax((logits + 0.3 * torch.randn(37, 512, generator=g, dtype=torch.float64)).to(dtype), dim=-1)
    kl, agree = kl_top1(ref, lp, sum_dtype)
    terms = ref.exp() * (ref - lp)
    before = float(terms.sum() if sum_dtype is None else terms.sum(dtype=sum_dtype))
    assert kl == before and kl_sum(ref, lp, sum_dtype) == before and isinstance(kl, float)
    assert agree == (ref.argmax(-1) == lp.argmax(-1)).sum().item() and isinstance(agree, int)
    assert 0 < agree < 37 and kl > 0


def test_models_that_do_not_fit_together_are_evaluated_one_at_a_time(tiny_model_factory, monkeypatch, caplog):
    """With no memory to spare, each model is loaded alone beside the reference: the same numbers as
    all of them at once, the reference's row once."""
    from frugal.compression import preflight
    from frugal.evaluation.metrics import Protocol
    from frugal.evaluation.suite import SuiteOptions, run_suite
    from frugal.load.model import shared_dir

    a, b, ref = (str(tiny_model_factory("llama", seed=s)) for s in (1, 2, 3))
    opts = SuiteOptions(protocol=Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 32, 256))
    together = run_suite([a, b], ref, opts)
    monkeypatch.setattr(preflight, "available_ram_bytes", lambda *_, **__: 0)
    with caplog.at_level("INFO", logger="frugal.evaluation.suite"):
        alone = run_suite([a, b], ref, opts)
    assert "memory for 1 model(s) at a time" in caplog.text
    assert [m["name"] for m in alone["models"]] == [ref, a, b] == [m["name"] for m in together["models"]]
    for x, y in zip(together["models"], alone["models"]):
        assert (x["perplexity"], x["kl"], x["top1"]) == (y["perplexity"], y["kl"], y["top1"])
    assert alone["protocol"] == together["protocol"]
