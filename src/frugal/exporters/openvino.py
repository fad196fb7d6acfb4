"""OpenVINO IR for the OpenVINO CPU plugin: a stateful decoder built op by op with the openvino Python
API (frugal.exporters.openvino_graph), quantized linears as OpenVINO's compressed-weight pattern
holding frugal's codes, scales and zero points exactly (frugal.exporters.openvino_weights).

Files: `openvino_model.xml` + `openvino_model.bin` (optimum-intel's names), config.json,
generation_config.json, tokenizer files, frugal.json. Inputs and outputs follow optimum-intel's
stateful exports:
    input_ids       int64 (batch, seq)
    attention_mask  int64 (batch, past + seq)
    position_ids    int64 (batch, seq)
    beam_idx        int32 (batch,)  row of the cache each row continues (arange for plain decoding)
    logits          float32 (batch, seq, vocab)
The KV cache is state (one variable per layer and part, (batch, n_kv_heads, past, head_dim) float32):
reset it to start a new sequence. Layout and limits: docs/formats.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from frugal.errors import FrugalError
from frugal.exporters.onnx import check_config as onnx_check_config
from frugal.families import FamilyRecord

XML_FILE = "openvino_model.xml"
BIN_FILE = "openvino_model.bin"
FORMAT_VERSION = "1"
HELD_BITS = (2, 3, 4, 8)  # u2 (2), i4/u4 containers (3, 4), i8/u8 (8): frugal.exporters.openvino_weights


def check_config(cfg: Any) -> FamilyRecord:
    """The family record of a transformers config, or a one-line FrugalError naming what is unsupported.
    The graph takes what the ONNX graph takes (same family records, same refusals)."""
    try:
        return onnx_check_config(cfg)
    except FrugalError as e:
        raise FrugalError(str(e).replace("--format onnx", "--format openvino", 1)) from None


def check(model: Any, recipe: Any) -> None:
    """Fail before any compression work when the IR cannot express `recipe` on `model`."""
    check_config(model.config)
    schemes = [("weights", recipe.weights)] + [(f"overrides {o.match!r}", o.weights) for o in recipe.overrides]
    for where, scheme in schemes:
        if scheme.bits not in HELD_BITS:
            raise FrugalError(f"--format openvino: {where}: {scheme.bits}-bit codes are not supported "
                              f"(supported: {', '.join(map(str, HELD_BITS))} bits)")


def build_model(compressed: Any) -> Any:
    """The stateful ov.Model of `compressed`, with deterministic node names."""
    import openvino as ov

    from frugal.exporters.openvino_graph import Ctx, decoder, make_inputs
    from frugal.version import __version__

    model = compressed.model
    c = Ctx(cfg=model.config, family=check_config(model.config),
            names={m: n for n, m in model.named_modules()}, quantized=compressed.quantized,
            head_dim=model.base_model.layers[0].self_attn.head_dim)
    make_inputs(c)
    logits = decoder(c, model)
    logits.output(0).get_tensor().set_names({"logits"})
    result = ov.opset13.result(logits, name="logits")
    ov_model = ov.Model([result], c.sinks, list(c.inputs.values()), "frugal")
    name_nodes(ov_model)
    ov_model.set_rt_info(FORMAT_VERSION, ["frugal", "openvino_format_version"])
    ov_model.set_rt_info(c.cfg.model_type, ["frugal", "model_type"])
    ov_model.set_rt_info(__version__, ["frugal", "version"])
    return ov_model


def name_nodes(model: Any) -> None:
    """Replace OpenVINO's automatic friendly names (`Type_<global counter>`, which depend on what the
    process built before) with `Type_<topological index>`, so the same model gives the same bytes."""
    for i, op in enumerate(model.get_ordered_ops()):
        if re.fullmatch(rf"{op.get_type_name()}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{i}")


def write(compressed: Any, directory: Any) -> None:
    """Write openvino_model.xml/.bin, config, tokenizer and frugal.json into `directory`."""
    import openvino as ov

    directory = Path(directory)
    model = compressed.model
    # compress_to_fp16=False: every constant keeps the type chosen for it (f32 stays f32, exactly)
    ov.save_model(build_model(compressed), directory / XML_FILE, compress_to_fp16=False)
    from frugal.exporters.hf import write_metadata

    write_metadata(model, compressed.tokenizer, directory, None)  # config.json (architectures), tokenizer
    report = compressed.report.to_dict()
    report["export"] = {"format": "openvino", "openvino_format_version": int(FORMAT_VERSION),
                        "openvino": ov.__version__.split("-")[0], "max_weight_rel_change": 0.0}
    (directory / "frugal.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def engines(recipe: Any, out: str) -> list:
    """Where an OpenVINO directory runs, with the command."""
    from frugal.exporters import Engine

    return [Engine("openvino", "OpenVINO", f'frugal.exporters.openvino_runtime.OvCausalLM("{out}").generate_greedy(ids, 32)'),
            Engine("openvino", "OpenVINO (any language)", f"ov.Core().compile_model('{out}/{XML_FILE}', 'CPU')  # stateful"),
            Engine("optimum-intel", "optimum-intel", f'OVModelForCausalLM.from_pretrained("{out}")  # optimum-intel 2.2 + transformers 5.5')]
