"""llm-compressor: oneshot with GPTQModifier (--method gptq) or QuantizationModifier (--method rtn),
one config group {targets: [Linear], weights: int<bits>, strategy group, group_size, symmetric (with
--asym symmetric: false, a zero point per group)}, ignore [lm_head]; calibration = the given token ids
as a datasets.Dataset. The quantized model is saved compressed (pack-quantized); the weights are
fake-quantized with the model's own scales and zero points (compressed_tensors.fake_quantize, which its
forward uses) to float32."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402


def run(r: _util.Run) -> None:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    a = r.args
    method = a.method or "gptq"
    ids, model = r.float_model()
    tok = r.tokenizer()
    names = set(_util.decoder_linears(model))
    sym = not a.asym
    groups = {"group_0": {"targets": ["Linear"],
                          "weights": {"num_bits": a.bits, "type": "int", "symmetric": sym,
                                      "strategy": "group", "group_size": a.group}}}
    if method == "gptq":
        modifier = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        modifier = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    fields = {k: v for k, v in modifier.model_dump().items()
              if k in ("block_size", "dampening_frac", "actorder", "offload_hessians", "sequential_targets",
                       "observer", "weight_observer", "batched_quantization")}
    r.note(f"{type(modifier).__name__}(config_groups={{targets: [Linear], weights: int{a.bits} group {a.group} "
           f"{'symmetric' if sym else 'asymmetric (symmetric=False)'}}}, ignore=[lm_head]); "
           f"other fields at their defaults: {fields}")
    kw = {}
    if method == "gptq":
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kw = dict(dataset=ds, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    with r.time("quant"):
        oneshot(model=model, recipe=modifier, tokenizer=tok, **kw)
    mods = dict(model.named_modules())
    weights = {}
    for name in sorted(names):
        m = mods[name]
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or not hasattr(m, "weight_scale"):
            raise RuntimeError(f"{name}: not quantized by llm-compressor")
        if getattr(m, "weight_g_idx", None) is not None and bool((m.weight_g_idx.diff() < 0).any()):
            raise RuntimeError(f"{name}: permuted group index (actorder=group) is not handled here")
        weights[name] = fake_quantize(m.weight.detach().float(), m.weight_scale.float(),
                                      getattr(m, "weight_zero_point", None), scheme.weights).float()
    r.write_dequantized(weights)
    r.native_check(model, ids)
    saved = r.out / "saved"
    with r.time("save"):
        model.save_pretrained(str(saved), save_compressed=True)
    import json

    qc = json.loads((saved / "config.json").read_text()).get("quantization_config", {})
    wargs = next(iter(qc.get("config_groups", {}).values()), {}).get("weights", {})
    r.note(f"saved as compressed-tensors format={qc.get('format')}; weight args as saved: "
           + ", ".join(f"{k}={v}" for k, v in wargs.items() if v not in (None, {}, False) or k == "dynamic"))
    r.result["saved_format"] = f"compressed-tensors {qc.get('format')}"
    r.result["symmetric"] = bool(wargs.get("symmetric", sym))
    r.result["versions"] = _util.versions("llmcompressor", "compressed-tensors", "datasets")


if __name__ == "__main__":
    _util.main(run, __doc__, "llm-compressor")
