"""GPTQModel: GPTQ through GPTQModel.load(float model, QuantizeConfig(bits, group_size, sym=True)) and
.quantize(calibration ids), its other defaults kept; saved in its GPTQ checkpoint format, which is
unpacked here to float32. With --asym: sym=False and format=gptq_v2, whose zero points are stored as
they are (the default v1 format stores them minus one, which underflows for a zero point of 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402


def run(r: _util.Run) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    a = r.args
    ids, float_model = r.float_model()
    shapes = {n: (m.in_features, m.out_features) for n, m in _util.decoder_linears(float_model).items()}
    del float_model
    fmt_kw = {"format": FORMAT.GPTQ_V2} if a.asym else {}
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group, sym=not a.asym, **fmt_kw)
    asked = "sym=True" if not a.asym else "sym=False, format=gptq_v2"
    r.note(f"QuantizeConfig(bits={a.bits}, group_size={a.group}, {asked}), defaults: desc_act={qcfg.desc_act}, "
           f"act_group_aware={getattr(qcfg, 'act_group_aware', None)}, damp_percent={getattr(qcfg, 'damp_percent', None)}, "
           f"damp_auto_increment={getattr(qcfg, 'damp_auto_increment', None)}, true_sequential={qcfg.true_sequential}, "
           f"mse={getattr(qcfg, 'mse', None)}, static_groups={getattr(qcfg, 'static_groups', None)}, "
           f"format={getattr(qcfg.format, 'value', qcfg.format)}, lm_head={qcfg.lm_head}; quantize(batch_size=1), "
           "calibration passed as token ids (no re-tokenization, no concatenation)")
    model = GPTQModel.load(a.model, qcfg, device="cpu")
    r.note(f"GPTQModel.load(float model, device='cpu') chose dtype {model.model.dtype} (its CPU default), so the "
           "calibration forward passes and GPTQ ran from that copy of the weights")
    calib = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]
    with r.time("quant"):
        model.quantize(calib, batch_size=1)
    saved = r.out / "saved"
    with r.time("save"):
        model.save(str(saved))
    del model
    qc = json.loads((saved / "quantize_config.json").read_text()) if (saved / "quantize_config.json").is_file() else {}
    r.result["saved_quantize_config"] = qc
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    offset = 0 if "v2" in str(fmt) else 1
    r.note(f"saved checkpoint_format={fmt} (zero points stored {'as is' if offset == 0 else 'minus one'})")
    tensors = _util.load_saved_tensors(saved)
    weights = {n: _util.dequantize_gptq(tensors, n, a.bits, i, o, offset) for n, (i, o) in shapes.items()}
    r.write_dequantized(weights)
    r.result["saved_format"] = f"GPTQ ({fmt})"
    r.result["symmetric"] = bool(qc.get("sym", True))
    try:  # its CPU kernel (TorchLinear) runs in float16/bfloat16 only, so the logits differ by that rounding
        native = GPTQModel.load(str(saved), device="cpu", backend=BACKEND.TORCH)
        mods = dict(native.model.named_modules())
        worst = 0.0
        for n, w in weights.items():
            own = mods[n].dequantize_weight().float()
            own = own.T if own.shape != w.shape or own.shape[0] == own.shape[1] else own
            worst = max(worst, ((own - w).abs() / w.abs().max()).max().item())
        r.result["native_weight_check"] = {"dtype": str(native.model.dtype), "max_rel_diff": worst}
        r.note(f"its own dequantize_weight() ({native.model.dtype}) vs the unpacked float32 weights: max difference "
               f"{worst:.2g} of each layer's max |w|")
        r.native_check(native.model, ids)
    except Exception as e:  # noqa: BLE001 - informative check only
        r.result["native_check"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    r.result["versions"] = _util.versions("gptqmodel")


if __name__ == "__main__":
    _util.main(run, __doc__, "GPTQModel")
