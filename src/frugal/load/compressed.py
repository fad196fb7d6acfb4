"""Reading frugal's compressed-tensors checkpoints back: the packed integer weights, unpacked exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from frugal.quant.grid import QuantizedWeight


def read_compressed_tensors(directory: Path) -> dict[str, QuantizedWeight]:
    """The integer weights of a frugal compressed-tensors directory, unpacked exactly."""
    import json
    import re

    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    cfg = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
    args = {}
    for group in cfg.get("config_groups", {}).values():
        args.update({t: group["weights"] for t in group["targets"]})
    out: dict[str, QuantizedWeight] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if not key.endswith(".weight_packed"):
                    continue
                name = key[: -len(".weight_packed")]
                a = args.get("Linear") or next(v for t, v in args.items() if t.startswith("re:") and
                                                re.match(t[3:], name))
                shape = torch.Size(st.get_tensor(f"{name}.weight_shape").tolist())
                q = unpack_from_int32(st.get_tensor(key), a["num_bits"], shape).to(torch.int8)
                zp = None
                if not a["symmetric"]:
                    packed = st.get_tensor(f"{name}.weight_zero_point")
                    scale = st.get_tensor(f"{name}.weight_scale")
                    zp = unpack_from_int32(packed, a["num_bits"], scale.shape, packed_dim=0).to(torch.int8)
                out[name] = QuantizedWeight(q, st.get_tensor(f"{name}.weight_scale"), zp, a["num_bits"],
                                            a["group_size"] or -1)
    return out


