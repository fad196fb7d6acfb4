"""Finding the decoder blocks and their linear layers, generically (no per-model scripts, no tracing).

The block list is the `nn.ModuleList` with the most parameters whose children all hold linear layers
(`model.layers` in Llama/Qwen/Gemma/Phi, `model.decoder.layers` in OPT, `transformer.h` in GPT-2; mixed
attention/recurrent layers in hybrid stacks), or the family record's `blocks` where that rule is wrong.
"""

from __future__ import annotations

import fnmatch

import torch.nn as nn

from frugal.quant.options import SUPPORTED_GROUPS, WeightScheme
from frugal.errors import FrugalError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module of the decoder block list: the family record's `blocks` path where it has one, else
    the `nn.ModuleList` with the most parameters whose every child holds linear layers (children may be of
    different classes: hybrid stacks of attention and recurrent layers)."""
    from frugal.families import family

    record = family(getattr(getattr(model, "config", None), "model_type", None))
    if record is not None and record.blocks:
        return record.blocks, model.get_submodule(record.blocks)
    best: tuple[str, nn.ModuleList] | None = None
    best_key = (0, 0)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not all(any(isinstance(m, nn.Linear) for m in b.modules()) for b in mod):
            continue
        key = (sum(p.numel() for p in mod.parameters()), len(mod))
        if key > best_key:
            best, best_key = (name, mod), key
    if best is None:
        raise FrugalError(f"{type(model).__name__}: no list of decoder blocks with linear layers found")
    return best


def is_ignored(name: str, ignore: tuple[str, ...]) -> bool:
    """True when a layer's full name matches one of the fnmatch patterns (or ends with one)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in ignore)


def block_linears(block: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear layers of one block to quantize, by full name, in module order (MoE routers stay float)."""
    from frugal.load.experts import routers

    skip = routers(block)
    return {
        f"{prefix}.{n}": m
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in skip and not is_ignored(f"{prefix}.{n}", ignore)
    }


HEAD = "lm_head"  # what `ignore` calls the output head, whatever the family names it


def outside_linears(model: nn.Module, blocks_name: str, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear layers outside the block list (e.g. lm_head) that the recipe does not ignore; the output head
    (get_output_embeddings: biogpt's `output_projection`, rwkv's `head`, ...) also matches `lm_head`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.startswith(blocks_name + ".") and not is_ignored(n, ignore)
        and not (m is head and is_ignored(HEAD, ignore))
    }


def quantizable_linears(model: nn.Module, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Every linear layer the recipe would quantize, blocks first."""
    blocks_name, blocks = find_blocks(model)
    layers: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        layers.update(block_linears(block, f"{blocks_name}.{i}", ignore))
    layers.update(outside_linears(model, blocks_name, ignore))
    return layers


def check_group_fit(layers: dict[str, nn.Linear], scheme: WeightScheme) -> None:
    """Refuse, before any work, a group size that does not divide some layer's input width."""
    if scheme.group_size == -1:
        return
    for name, lin in layers.items():
        if lin.in_features % scheme.group_size:
            fits = [g for g in SUPPORTED_GROUPS if g != -1 and all(m.in_features % g == 0 for m in layers.values())]
            fits_txt = ", ".join(str(g) for g in fits) + (", " if fits else "") + "-1 (per channel)"
            raise FrugalError(
                f"{name}: in_features {lin.in_features} is not a multiple of group size "
                f"{scheme.group_size} (recipe.strict_groups); group sizes that fit every layer: {fits_txt}"
            )
