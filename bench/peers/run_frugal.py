"""frugal itself (project venv): RTN, GPTQ or HQQ through frugal.compress, optionally with AWQ scales
(--awq), an offline Hadamard rotation (--rotate) and asymmetric grids (--asym); saved as compressed-tensors.

With --awq or --rotate, frugal changes tensors besides the linears (AWQ folds its scales into the
preceding norm or linear; the rotation rotates the embeddings and the head and unties it), so OUT/deq
is the whole compressed model's state, not the original with its linears replaced."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def run(r: _util.Run) -> None:
    import frugal
    from frugal.load.model import load_model

    a = r.args
    method = a.method or "gptq"
    ids = r.calib()
    loaded = load_model(a.orig)
    r.save_float_logits(loaded.model, ids)
    extra = _extra_args()
    spec = {"method": method, "weights": {"bits": a.bits, "group_size": a.group, "symmetric": not extra.asym},
            "calibration": {"num_samples": ids.shape[0], "seq_len": ids.shape[1]}, "ignore": ["lm_head"], "seed": 0}
    if extra.awq != "off":
        spec["awq"] = {"enabled": True, "clip": extra.awq == "full"}
    if extra.rotate:
        spec["rotation"] = {"kind": "hadamard"}
    if extra.refine:
        spec["refine"] = {"enabled": True}
    if extra.scale_dtype:
        spec["weights"]["scale_dtype"] = extra.scale_dtype
    if extra.storage_dtype:
        spec["storage"] = {"dtype": extra.storage_dtype}
    recipe = frugal.Recipe.from_dict(spec)
    with r.time("quant"):
        res = frugal.compress(loaded.model, recipe, ids, tokenizer=loaded.tokenizer, inplace=True)
    r.result["recipe"] = recipe.to_dict()
    r.result["stages"] = dict(getattr(res.report, "stages", {}))  # wall seconds per stage (frugal >= 0.1 speed work)
    r.note(_describe(recipe, extra))
    r.result["symmetric"] = not extra.asym
    weights = {name: q.dequantize() for name, q in res.quantized.items()}
    # the compressed model's own weights must equal the dequantized codes (frugal evaluates res.model)
    mods = dict(res.model.named_modules())
    for name, w in weights.items():
        if not (mods[name].weight.detach().float() == w).all():
            raise AssertionError(f"{name}: model weight differs from dequantized codes")
    if extra.awq != "off" or extra.rotate:
        r.write_model_state(res.model)
    else:
        r.write_dequantized(weights)
    res.save(r.out / "saved", overwrite=True)
    r.result["computed_bytes"] = sum(q.nbytes() for q in res.quantized.values())
    r.result["saved_format"] = "compressed-tensors pack-quantized"
    r.native_check(res.model, ids)
    r.result["versions"] = _util.versions("frugal", "compressed-tensors")


def _extra_args():
    """frugal-only flags (the shared runner parser leaves them in sys.argv)."""
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--awq", choices=("off", "scales", "full"), default="off")
    ap.add_argument("--rotate", action="store_true")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--storage-dtype", default=None, help="storage.dtype (model: no 16-bit rounding, as every "
                    "frugal version reads it)")
    ap.add_argument("--scale-dtype", default=None, help="weights.scale_dtype (e.g. bfloat16: what two frugal "
                    "versions with different scale defaults both read)")
    return ap.parse_known_args()[0]


def _describe(recipe, extra) -> str:
    d = recipe.to_dict()
    parts = [f"method {recipe.method}"]
    if recipe.method == "gptq":
        parts.append(f"GPTQ options {d['gptq']}")
    if recipe.method == "hqq":
        parts.append(f"HQQ options {d['hqq']}")
    if extra.awq != "off":
        parts.append("AWQ scales (alpha searched on the block output error)"
                     + (" and clip search" if extra.awq == "full" else ", no clip search"))
    if extra.rotate:
        parts.append("Hadamard rotation (R1 residual stream + per-head R2) fused into the weights, head untied")
    if extra.refine:
        parts.append(f"block-wise output-error refinement {d.get('refine')}")
    w = recipe.weights
    if extra.asym:
        grid = "asymmetric (integer zero point per group)"
    elif w.signed_scale:
        grid = "symmetric, signed-extreme scale (extreme / -8 per group, all 16 levels)"
    else:
        grid = "symmetric scale max|w|/7.5 per group"
    scales = recipe.storage.scale_dtype if w.scale_dtype == "model" else w.scale_dtype
    return "; ".join(parts) + (f"; {grid}, scales stored in {scales}, unquantized tensors in "
                               f"{recipe.storage.dtype}, recipe.clip off")


if __name__ == "__main__":
    _util.main(run, __doc__, "frugal")
