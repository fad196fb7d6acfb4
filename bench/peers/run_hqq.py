"""HQQ: calibration-free half-quadratic quantization, HQQLinear on every decoder linear with
BaseQuantizeConfig(nbits, group_size) -- its defaults otherwise (asymmetric: a scale and a zero point
per group, zero rounded for 4 bits, axis=1, optimize=True); compute dtype float32 on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402


def run(r: _util.Run) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from tqdm import tqdm

    a = r.args
    ids, model = r.float_model()  # calibration-free: the ids only feed the logit checks
    lins = _util.decoder_linears(model)
    cfg = BaseQuantizeConfig(nbits=a.bits, group_size=a.group)
    r.note(f"BaseQuantizeConfig(nbits={a.bits}, group_size={a.group}) -> weight params {cfg['weight_quant_params']}; "
           "HQQ has no symmetric mode: asymmetric, fp scale and zero point per group (zero rounded to an integer for 4 bits); "
           "HQQLinear(compute_dtype=float32, device='cpu') (its defaults float16/cuda), backend PYTORCH")
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    parents = dict(model.named_modules())
    hq = {}
    with r.time("quant"):
        for name, lin in tqdm(list(lins.items()), desc="HQQ", unit="linear", mininterval=5):
            parent, child = name.rsplit(".", 1)
            q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=True)
            setattr(parents[parent], child, q)
            hq[name] = q
    weights, n, groups, mem = {}, 0, 0, 0
    for name, q in hq.items():
        w = q.dequantize().float()
        weights[name] = w.reshape(q.meta["shape"])
        n += w.numel()
        groups += w.numel() // a.group
        mem += _util.tensor_bytes(q.W_q, q.meta.get("scale"), q.meta.get("zero"))
    r.finish_unsaved(model, ids, weights, n, groups, zeros=True, in_memory=mem,
                     note=f"no saved format written (HQQ saves via torch pickles); bytes computed as {a.bits}-bit codes "
                          f"+ fp16 scales + fp16 zero points; in memory with float32 meta: {mem} bytes")
    r.result["versions"] = _util.versions("hqq")


if __name__ == "__main__":
    _util.main(run, __doc__, "HQQ")
