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
    ids = r.calib()  # calibration-free: the tokens are only used for the logit checks
    model = r.load_float()
    r.save_float_logits(model, ids)
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
        mem += q.W_q.numel() * q.W_q.element_size()
        for k in ("scale", "zero"):
            t = q.meta.get(k)
            if isinstance(t, torch.Tensor):
                mem += t.numel() * t.element_size()
    r.write_dequantized(weights)
    r.result["computed_bytes"] = _util.codes_bytes(n, groups, a.bits, zeros=True)
    r.result["in_memory_bytes"] = mem
    r.result["symmetric"] = False
    r.note(f"no saved format written (HQQ saves via torch pickles); bytes computed as {a.bits}-bit codes + fp16 scales + "
           f"fp16 zero points; in memory with float32 meta: {mem} bytes")
    r.native_check(model, ids)
    r.result["versions"] = _util.versions("hqq")


if __name__ == "__main__":
    _util.main(run, __doc__, "HQQ")
