"""The real default model (SmolLM2-135M-Instruct from its GGUF): compress, save, reload, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import CALIB_TEXT, EVAL_TEXT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from frugal.errors import FrugalError
    from frugal.load.model import load_model

    try:
        return load_model(None)
    except FrugalError as e:
        pytest.skip(str(e))


def test_gptq_w4_default_model_end_to_end(default_model, tmp_path):
    """GPTQ W4 g64 on 8 x 256 calibration tokens: reloads in a fresh process with the same logits (frugal's
    reader exactly, transformers within the one bfloat16 rounding of (q - z) * s its route adds), and
    stays close to the original on held-out text."""
    import torch

    import frugal
    from frugal.evaluation.metrics import Protocol, evaluate

    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 64},
              "calibration": {"num_samples": 8, "seq_len": 256}}
    res = frugal.compress(default_model.model, recipe, str(CALIB_TEXT), tokenizer=default_model.tokenizer)
    assert len(res.quantized) == 30 * 7  # q k v o gate up down in every block; lm_head stays float
    out = res.save(tmp_path / "w4")
    report = json.loads((out / "frugal.json").read_text())
    assert set(report["layers"]) == set(res.quantized)

    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 378, 2436, 355, 260, 12034, 30]])
    with torch.no_grad():
        ours = res.model(ids).logits[0]
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import torch, transformers
        from frugal.load.model import load_model
        m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            torch.save(m(ids).logits[0], {str(tmp_path / 'theirs.pt')!r})
            torch.save(load_model({str(out)!r}).model(ids).logits[0], {str(tmp_path / 'frugal.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    theirs, again = torch.load(tmp_path / "theirs.pt"), torch.load(tmp_path / "frugal.pt")
    assert (ours - again).abs().max().item() <= 1e-4  # frugal's reader: (q - z) * s in float32, as in memory
    kl = torch.nn.functional.kl_div(theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 2e-3 and (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9

    protocol = Protocol(text=str(EVAL_TEXT), seq_len=512, max_tokens=1024)
    ref, comp = evaluate({"w4": res.model}, default_model.tokenizer, protocol, ref=default_model.model)
    assert 20 < ref.ppl < 45  # the float model on this text (28.7 over 40 windows)
    assert comp.ppl < 1.6 * ref.ppl
    assert comp.kl < 0.5 and comp.top1 > 0.6
