"""NNCF (OpenVINO): nncf.compress_weights on an OpenVINO model of the float model.

--method is a mode with optional data-aware algorithms joined by '+': int4_sym, int4_asym,
int4_asym+awq+se, int4_asym+awq+se+gptq, ... (awq, se = scale_estimation, gptq). The float
HF model is converted with openvino.convert_model (logits of input_ids, attention mask all ones), then
compressed with group_size=--group, ratio=1.0 (every decoder linear 4-bit) and backup_mode=NONE, so
the tied embedding/head, which NNCF's defaults would put to INT8_ASYM, stays float like every other
peer's. Data-aware methods read the same calibration ids (the first --nsamples of them, all by
default) as nncf.Dataset, subset_size = their number. Each linear's weight is read back by evaluating
its decompression subgraph (int4 codes, zero points, scales) in OpenVINO in float32, which is what the
CPU plugin computes, and written as float32; the IR is kept in OUT/ov.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _util  # noqa: E402

ALGOS = {"awq": "awq", "se": "scale_estimation", "gptq": "gptq"}
NODE_RE = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(\w+_proj)/")


class _Logits(torch.nn.Module):
    """The HF model as a function of input_ids only (no cache, full attention mask), for conversion."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


class _OvLM(torch.nn.Module):
    """A compiled OpenVINO model behind the `model(input_ids=...).logits` interface of the checks."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        out = self.compiled({0: input_ids.numpy()})[0]

        class _O:
            logits = torch.from_numpy(out.copy())

        return _O()


def parse_method(method: str | None) -> dict:
    parts = (method or "int4_sym").split("+")
    if parts[0] not in ("int4_sym", "int4_asym"):
        raise ValueError(f"--method {method}: the mode must be int4_sym or int4_asym")
    unknown = [p for p in parts[1:] if p not in ALGOS]
    if unknown:
        raise ValueError(f"--method {method}: unknown algorithm(s) {unknown}; known: {list(ALGOS)}")
    return {"mode": parts[0].upper(), **{ALGOS[p]: True for p in parts[1:]}}


def to_openvino(model, ids: torch.Tensor):
    import openvino as ov

    with torch.no_grad():
        return ov.convert_model(_Logits(model).eval(), example_input=(ids[:1, :16],),
                                input=[ov.PartialShape([1, -1])])


def compress_kwargs(spec: dict, a, cal: torch.Tensor) -> tuple[dict, str]:
    """compress_weights keyword arguments and their text for the notes."""
    import nncf

    kw = dict(mode=getattr(nncf.CompressWeightsMode, spec["mode"]), group_size=a.group, ratio=1.0,
              backup_mode=nncf.BackupMode.NONE)
    text = f"mode={spec['mode']}, group_size={a.group}, ratio=1.0, backup_mode=NONE"
    algos = {k: v for k, v in spec.items() if k != "mode"}
    if algos:
        data = [row[None].numpy() for row in cal]
        kw |= dict(dataset=nncf.Dataset(data), subset_size=len(data), **algos)
        text += (f", dataset=<{cal.shape[0]} x {cal.shape[1]} calibration ids>, subset_size={len(data)}, "
                 + ", ".join(f"{k}=True" for k in algos))
    return kw, text


def hf_name(node_name: str) -> str | None:
    m = NODE_RE.search(node_name)
    return f"model.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def read_weights(compressed, names: list[str]) -> tuple[dict[str, torch.Tensor], int, dict]:
    """{linear name: float32 weight} evaluated from each MatMul's weight subgraph, the bytes of the
    constants those subgraphs hold, and the element types seen (codes, scales, zero points)."""
    import openvino as ov
    import openvino.opset13 as ops

    outs, found, nbytes, types = [], [], 0, {}
    for node in compressed.get_ordered_ops():
        name = hf_name(node.get_friendly_name()) if node.get_type_name() == "MatMul" else None
        if name is None or name not in names:
            continue
        src = node.input(1).get_source_output()
        for const in _constants(src.get_node()):
            et = const.get_element_type().get_type_name()
            if et not in ("i64", "i32"):  # shape constants of the Reshape are no weight data
                nbytes += const.get_byte_size()
                types[et] = types.get(et, 0) + 1
        outs.append(ops.result(ops.convert(src, "f32")))
        found.append(name)
    missing = sorted(set(names) - set(found))
    if missing:
        raise RuntimeError(f"{len(missing)} linears not found in the compressed IR, e.g. {missing[0]}")
    compiled = ov.Core().compile_model(ov.Model(outs, [], "weights"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled({})
    weights = {n: torch.from_numpy(res[i].copy()) for i, n in enumerate(found)}
    return weights, nbytes, types


def _constants(node) -> list:
    """The Constant nodes a weight subgraph is computed from."""
    if node.get_type_name() == "Constant":
        return [node]
    out = []
    for i in range(node.get_input_size()):
        out += _constants(node.input(i).get_source_output().get_node())
    return out


def run(r: _util.Run) -> None:
    import nncf
    import openvino as ov

    a = r.args
    spec = parse_method(a.method)
    ids, model = r.float_model()
    cal = r.calib_subset(ids) if len(spec) > 1 else ids[:0]  # data-free: the ids only feed the checks
    names = list(_util.decoder_linears(model))
    with r.time("convert"):
        ovm = to_openvino(model, ids)
    kw, text = compress_kwargs(spec, a, cal)
    with r.time("quant"):
        comp = nncf.compress_weights(ovm, **kw)
    weights, nbytes, types = read_weights(comp, names)
    (r.out / "ov").mkdir()
    ov.save_model(comp, str(r.out / "ov" / "openvino_model.xml"), compress_to_fp16=False)
    r.write_dequantized(weights)
    sym = spec["mode"] == "INT4_SYM"
    r.result |= {"computed_bytes": nbytes, "bytes_from": "the IR's constants", "symmetric": sym,
                 "nncf_method": a.method, "saved_format": "OpenVINO IR (OUT/ov)"}
    r.note(f"openvino.convert_model(float model) then nncf.compress_weights({text}); other parameters at "
           "their defaults (AdvancedCompressionParameters())")
    grid = ("symmetric: signed int4 codes, a scale per group" if sym else
            "asymmetric: uint4 codes, a scale and a uint4 zero point per group")
    r.note(f"{grid}; decompression constants by element type {types}; linear MB = their bytes in the IR")
    r.note("weights read back by evaluating each decompression subgraph in OpenVINO (CPU, float32)")
    r.native_check(_OvLM(ov.Core().compile_model(comp, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})), ids)
    r.result["versions"] = _util.versions("nncf", "openvino")


if __name__ == "__main__":
    _util.main(run, __doc__, "NNCF")
