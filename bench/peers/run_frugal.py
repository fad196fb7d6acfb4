"""frugal itself (project venv): RTN or GPTQ, symmetric, through frugal.compress, saved as compressed-tensors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def run(r: _util.Run) -> None:
    import frugal
    from frugal.load import load_model

    a = r.args
    method = a.method or "gptq"
    ids = r.calib()
    loaded = load_model(a.orig)
    r.save_float_logits(loaded.model, ids)
    recipe = frugal.Recipe.from_dict({"method": method,
                                      "weights": {"bits": a.bits, "group_size": a.group, "symmetric": True},
                                      "calibration": {"num_samples": ids.shape[0], "seq_len": ids.shape[1]},
                                      "ignore": ["lm_head"], "seed": 0})
    with r.time("quant"):
        res = frugal.compress(loaded.model, recipe, ids, tokenizer=loaded.tokenizer, inplace=True)
    r.result["recipe"] = recipe.to_dict()
    r.note(f"recipe defaults: {recipe.to_dict()['gptq'] if method == 'gptq' else 'round to nearest'}; "
           "symmetric scale max|w|/7.5 per group, stored in the model's dtype (float32 here), clip search off")
    weights = {name: q.dequantize() for name, q in res.quantized.items()}
    # the compressed model's own weights must equal the dequantized codes (frugal evaluates res.model)
    mods = dict(res.model.named_modules())
    for name, w in weights.items():
        if not (mods[name].weight.detach().float() == w).all():
            raise AssertionError(f"{name}: model weight differs from dequantized codes")
    r.write_dequantized(weights)
    res.save(r.out / "saved", overwrite=True)
    r.result["computed_bytes"] = sum(q.nbytes() for q in res.quantized.values())
    r.result["saved_format"] = "compressed-tensors pack-quantized"
    r.native_check(res.model, ids)
    r.result["versions"] = _util.versions("frugal", "compressed-tensors")


if __name__ == "__main__":
    _util.main(run, __doc__, "frugal")
