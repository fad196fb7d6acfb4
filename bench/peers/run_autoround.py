"""AutoRound: SignRound (signed-gradient rounding and clipping per block) through
AutoRound(model, tokenizer, bits, group_size, sym=True, dataset=<the calibration ids, or the first
--nsamples of them>, nsamples=N, seqlen=L, iters=..., any --kw KEY=VALUE) and .quantize(), its other
defaults kept; the tuned fake-quantized weights are read from the model, then saved in its default
auto_round format (the saved codes are unpacked and checked against them)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402


def run(r: _util.Run) -> None:
    from auto_round import AutoRound

    a = r.args
    ids, model = r.float_model()
    cal = r.calib_subset(ids)
    tok = r.tokenizer()
    names = list(_util.decoder_linears(model))
    shapes = {n: (m.in_features, m.out_features) for n, m in _util.decoder_linears(model).items()}
    kw = dict(bits=a.bits, group_size=a.group, sym=True, dataset=[row[None] for row in cal],
              nsamples=cal.shape[0], seqlen=cal.shape[1], device_map="cpu")
    if a.iters is not None:
        kw["iters"] = a.iters
    extra = _util.extra_kwargs(a.kw)
    kw |= extra
    ar = AutoRound(model, tok, **kw)
    cfg = {k: getattr(ar, k, None) for k in ("iters", "lr", "minmax_lr", "batch_size", "gradient_accumulate_steps",
                                             "nsamples", "seqlen", "enable_minmax_tuning", "enable_norm_bias_tuning",
                                             "enable_quanted_input", "enable_torch_compile", "amp", "amp_dtype",
                                             "scale_dtype", "data_type", "sym", "group_size", "bits", "seed",
                                             "low_cpu_mem_usage")}
    for sub in ("quantize_config", "quant_config", "alg_config"):
        obj = getattr(ar, sub, None)
        if obj is not None:
            for k in list(cfg):
                if cfg[k] is None and getattr(obj, k, None) is not None:
                    cfg[k] = getattr(obj, k)
    cfg = {k: v for k, v in cfg.items() if v is None or isinstance(v, (bool, int, float, str, torch.dtype))}
    r.result["autoround_config"] = {k: str(v) for k, v in cfg.items()}
    r.result["iters"] = a.iters if a.iters is not None else cfg.get("iters")
    r.note(f"AutoRound(bits={a.bits}, group_size={a.group}, sym=True, dataset=<{cal.shape[0]} x {cal.shape[1]} ids>, "
           f"nsamples={cal.shape[0]}, seqlen={cal.shape[1]}, device_map='cpu'"
           f"{f', iters={a.iters}' if a.iters is not None else ''}"
           + "".join(f", {k}={v!r}" for k, v in extra.items()) + "); resolved settings: "
           + ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None))
    with r.time("quant"):
        ar.quantize()
    mods = dict(model.named_modules())
    weights = {n: mods[n].weight.detach().float().clone() for n in names}
    r.write_dequantized(weights)
    r.native_check(model, ids)
    saved = r.out / "saved"
    with r.time("save"):
        ar.save_quantized(str(saved), format="auto_round")
    tensors = _util.load_saved_tensors(saved)
    if all(f"{n}.qweight" in tensors for n in names):
        best = None
        for offset in (0, 1):
            diff = max((_util.dequantize_gptq(tensors, n, a.bits, *shapes[n], offset) - weights[n]).abs().max().item()
                       for n in names)
            best = (diff, offset) if best is None or diff < best[0] else best
        r.result["saved_vs_model_max_abs_diff"] = best[0]
        r.note(f"saved auto_round checkpoint unpacked (zero offset {best[1]}): max |w_saved - w_model| = {best[0]:.3g}")
    else:
        r.note("saved checkpoint has no GPTQ-style qweight tensors; not cross-checked")
    r.result["saved_format"] = "auto_round"
    r.result["symmetric"] = True
    r.result["versions"] = _util.versions("auto-round")


if __name__ == "__main__":
    _util.main(run, __doc__, "AutoRound")
