"""optimum-quanto: quantize(model, weights=qint<bits>, exclude=lm_head) then freeze(), its default
optimizer (MaxOptimizer: asymmetric, a scale and a shift per group). quanto picks the group size
itself (128, else the largest multiple of 32 dividing the input width: 96 for 576 inputs); it is set
to `--group` on every quantized module before freezing so the scheme matches the other libraries."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402


def run(r: _util.Run) -> None:
    import optimum.quanto as oq
    from optimum.quanto import freeze, quantize

    a = r.args
    ids, model = r.float_model()  # calibration-free: the ids only feed the logit checks
    names = set(_util.decoder_linears(model))
    qtype = getattr(oq, f"qint{a.bits}", None)
    if qtype is None:
        raise ValueError(f"optimum-quanto has no qint{a.bits} weight type")
    with r.time("quant"):
        quantize(model, weights=qtype, exclude=["lm_head"])
        mods = dict(model.named_modules())
        own = sorted({getattr(mods[n], "weight_group_size", None) for n in names}, key=str)
        for n in names:
            mods[n].weight_group_size = a.group
        freeze(model)
    r.note(f"quantize(model, weights=qint{a.bits}, exclude=['lm_head']); freeze(model); default optimizer "
           f"(asymmetric: scale + shift per group); its own group sizes here would have been {own}, overridden to {a.group}")
    weights, n, groups = {}, 0, 0
    for name in sorted(names):
        w = mods[name].weight
        r.result.setdefault("weight_type", type(w).__name__)
        weights[name] = w.dequantize().float()
        n += weights[name].numel()
        groups += weights[name].numel() // a.group
    r.finish_unsaved(model, ids, weights, n, groups, zeros=True,
                     note=f"no saved format written; bytes computed as {a.bits}-bit codes + fp16 scales + fp16 shifts")
    r.result["versions"] = _util.versions("optimum-quanto")


if __name__ == "__main__":
    _util.main(run, __doc__, "optimum-quanto")
