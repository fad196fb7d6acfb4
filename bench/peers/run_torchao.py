"""torchao: quantize_ with IntxWeightOnlyConfig(weight_dtype=int<bits>, granularity=PerGroup(group)),
symmetric (its default mapping), decoder linears only (lm_head and embeddings stay float)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402


def run(r: _util.Run) -> None:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    a = r.args
    ids, model = r.float_model()  # calibration-free: the ids only feed the logit checks
    names = set(_util.decoder_linears(model))
    dtype = getattr(torch, f"int{a.bits}")
    config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(a.group))
    r.note(f"config as used: {config!r}")
    with r.time("quant"):
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in names)
    mods = dict(model.named_modules())
    weights, n, groups, zeros, mem = {}, 0, 0, False, 0
    for name in sorted(names):
        w = mods[name].weight
        r.result.setdefault("weight_type", type(w).__name__)
        weights[name] = w.dequantize().float()
        n += w.shape[0] * w.shape[1]
        groups += w.shape[0] * (w.shape[1] // a.group)
        zp = getattr(w, "zero_point", None)
        if zp is not None and bool((zp != 0).any()):
            zeros = True
        mem += _util.tensor_bytes(*(getattr(w, attr, None) for attr in ("qdata", "scale", "zero_point")))
    r.finish_unsaved(model, ids, weights, n, groups, zeros, in_memory=mem,
                     note=f"no saved format written; bytes computed as {a.bits}-bit codes + fp16 scales"
                          f"{' + fp16 zeros' if zeros else ''}; in memory (CPU layout {r.result.get('weight_type')}): "
                          f"{mem} bytes")
    r.result["versions"] = _util.versions("torchao")


if __name__ == "__main__":
    _util.main(run, __doc__, "torchao")
