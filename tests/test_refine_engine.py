"""Refinement through the engine, the API and the CLI: the float-target stream, save/reload, composition
with AWQ and rotation, calibration for RTN, and the refusals (GGUF targets, streaming)."""

from __future__ import annotations

import json

import pytest
import torch

import frugal
from frugal.errors import FrugalError

CALIB = torch.randint(3, 512, (16, 64), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(5))
W3 = {"bits": 3, "group_size": 32, "symmetric": False}
REFINE = {"enabled": True}  # 50 steps per block


def recipe(method: str = "gptq", **extra) -> dict:
    return {"method": method, "weights": W3, "calibration": {"num_samples": 16, "seq_len": 64}, **extra}


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    p = torch.log_softmax(ref.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(out.double(), -1))).sum(-1).mean())


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    from frugal.load.model import load_model

    path = tiny_model_factory("llama", initializer_range=0.05)
    return path, load_model(path).model


def test_targets_are_the_float_models_block_outputs(llama, monkeypatch):
    """Block i is refined towards the float model's output of block i (not the quantized model's)."""
    import frugal.compression.engine as engine

    _, model = llama
    seen = []
    real = engine.quantize_block

    def spy(block, prefix, rec, hidden, args, kw, ggml_types, targets=None):
        if targets is not None:
            seen.append([t.clone() for t in targets])
        return real(block, prefix, rec, hidden, args, kw, ggml_types, targets)

    import copy

    from frugal.compression.transforms.storage import _to_quantize, round_parameters
    from frugal.config import as_recipe

    monkeypatch.setattr(engine, "quantize_block", spy)
    frugal.compress(model, recipe(refine=REFINE), CALIB)
    model = copy.deepcopy(model)
    # the float model with what stays unquantized as stored (recipe.storage), which it is refined towards
    round_parameters(model, torch.bfloat16, _to_quantize(model, "", as_recipe(recipe(refine=REFINE))))
    outputs: list[list[torch.Tensor]] = [[], []]  # the float model's block outputs, per block
    hooks = [b.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple)
                                                                                  else out))
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        for j in range(CALIB.shape[0]):
            model(CALIB[j : j + 1])
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    for i in range(2):
        for j in range(CALIB.shape[0]):
            assert torch.allclose(seen[i][j], outputs[i][j], atol=1e-5, rtol=1e-5)


def test_refined_model_saves_reloads_and_is_closer_to_float(llama, tmp_path):
    """Saved and reloaded by frugal's loader with the same logits and the very same codes. KL to the float
    model (observed on this tiny model, max|w| grid): RTN 0.0100 -> 0.0071 with refinement (calibrated now;
    on the signed-extreme grid RTN starts lower and gains less: 0.0097 -> 0.0085 with bfloat16 storage); GPTQ
    0.0064 -> 0.0062 (per block the refinement is never worse on held-out samples, but GPTQ leaves little
    to gain on a random model, less than bfloat16 storage's rounding moves it: float32 storage here)."""
    from frugal.load.compressed import read_compressed_tensors
    from frugal.load.model import load_model

    _, model = llama
    ref = logits(model)
    f32 = {"storage": {"dtype": "model", "scale_dtype": "model"}}  # float32 tensors and scales
    plain = frugal.compress(model, recipe(**f32), CALIB)
    refined = frugal.compress(model, recipe(refine=REFINE, **f32), CALIB)
    k_plain, k_ref = kl(ref, logits(plain.model)), kl(ref, logits(refined.model))
    assert k_ref < k_plain, (k_plain, k_ref)
    assert any(not torch.equal(plain.quantized[n].q, refined.quantized[n].q) for n in plain.quantized)
    out = refined.save(tmp_path / "gptq-refine")
    back = load_model(out).model
    assert (logits(back) - logits(refined.model)).abs().max() <= 1e-4
    codes = read_compressed_tensors(out)
    for n, qw in refined.quantized.items():
        assert torch.equal(codes[n].q, qw.q) and torch.equal(codes[n].scale, qw.scale)
    assert json.loads((out / "frugal.json").read_text())["recipe"]["refine"]["enabled"] is True
    rtn = frugal.compress(model, recipe("rtn", **f32), CALIB)
    rtn_refined = frugal.compress(model, recipe("rtn", refine=REFINE, **f32), CALIB)
    assert rtn.report.calibration["source"] is None and rtn_refined.report.calibration["num_samples"] == 16
    assert kl(ref, logits(rtn_refined.model)) < 0.9 * kl(ref, logits(rtn.model))  # 0.87 with bfloat16 storage


def test_composes_with_awq_and_rotation(llama, tmp_path):
    import transformers

    _, model = llama
    res = frugal.compress(model, recipe(awq={"enabled": True}, rotation={"kind": "hadamard"}, refine=REFINE), CALIB)
    from frugal.load.model import load_model

    back = load_model(res.save(tmp_path / "all")).model.eval()
    got = logits(back)
    assert (got - logits(res.model)).abs().max() <= 1e-4
    assert kl(logits(model), got) < 0.1  # quantized, not broken


def test_tuned_norms_are_saved_and_reload_in_transformers(llama, tmp_path):
    """With `norms` the refined norm weights go into the block and the checkpoint (float tensors, as before);
    plain transformers reloads the same logits, closer to the float model than RTN alone (observed KL
    0.0100 -> 0.0081; 0.0071 with refinement without norms: on a random model the blocks' gains on held-out
    samples need not add up)."""
    import transformers

    _, model = llama
    ref = logits(model)
    plain = frugal.compress(model, recipe("rtn"), CALIB)
    tuned = frugal.compress(model, recipe("rtn", refine={"enabled": True, "norms": True}), CALIB)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(tuned.model.state_dict()[norm], model.state_dict()[norm])
    assert torch.equal(plain.model.state_dict()[norm], model.state_dict()[norm])
    assert kl(ref, logits(tuned.model)) < 0.9 * kl(ref, logits(plain.model))
    from frugal.load.model import load_model

    back = load_model(tuned.save(tmp_path / "norms")).model.eval()
    assert torch.equal(back.state_dict()[norm], tuned.model.state_dict()[norm])
    assert (logits(back) - logits(tuned.model)).abs().max() <= 1e-4


def test_same_inputs_same_bytes(llama, tmp_path):
    from conftest import dir_digest

    _, model = llama
    a = frugal.compress(model, recipe("rtn", refine=REFINE), CALIB).save(tmp_path / "a")
    b = frugal.compress(model, recipe("rtn", refine=REFINE), CALIB).save(tmp_path / "b")
    assert dir_digest(a) == dir_digest(b)


def test_cli_refine(llama, tmp_path):
    import frugal.cli.main as cli

    path, _ = llama
    out = tmp_path / "cli"
    args = ["compress", str(path), "--method", "rtn", "--bits", "4", "--group-size", "32", "--refine-norms",
            "--refine-iters", "5", "--samples", "4", "--calib-len", "32", "--no-eval", "-o", str(out)]
    assert cli.main(args) == 0
    meta = json.loads((out / "frugal.json").read_text())
    assert meta["recipe"]["refine"]["enabled"] is True and meta["recipe"]["refine"]["iters"] == 5
    assert meta["recipe"]["refine"]["norms"] is True
    assert meta["calibration"]["num_samples"] == 4


def test_refusals_name_the_option(llama, tmp_path, capsys):
    import frugal.cli.main as cli
    from frugal.config import Recipe
    from frugal.compression.engine import quantize_block
    from frugal.compression.stream import compress_streaming

    path, model = llama
    with pytest.raises(FrugalError, match=r"^recipe\.refine\.enabled with recipe\.gguf_type") as info:
        frugal.compress(model, {"gguf_type": "Q4_0", "refine": {"enabled": True}}, CALIB)
    assert "\n" not in str(info.value)
    with pytest.raises(FrugalError, match=r"^recipe\.refine: refinement carries") as info:
        compress_streaming(str(path), recipe(refine=REFINE), tmp_path / "s", CALIB)
    assert "\n" not in str(info.value) and not (tmp_path / "s").exists()
    block = model.model.layers[0]
    with pytest.raises(FrugalError, match=r"layers\.0: recipe\.refine needs calibration inputs"):
        quantize_block(block, "model.layers.0", Recipe.from_dict(recipe("rtn", refine=REFINE)), None, (), {}, {})
    capsys.readouterr()
    args = ["compress", str(path), "--method", "rtn", "--group-size", "32", "--refine", "--stream", "--no-eval",
            "-o", str(tmp_path / "c")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--refine" in err[0], err


def test_cli_awq_no_clip_sets_scales_only():
    from frugal.cli.main import _parser, recipe_from_args

    a = _parser().parse_args(["compress", "--awq-no-clip", "--refine", "--asym", "-o", "x"])
    r = recipe_from_args(a)
    assert r.awq.enabled and not r.awq.clip and r.refine.enabled and not r.weights.symmetric
    r = recipe_from_args(_parser().parse_args(["compress", "--awq", "-o", "x"]))
    assert r.awq.enabled and r.awq.clip
