"""A Hugging Face checkpoint directory: config.json, safetensors shards, tokenizer, generation config."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

MAX_SHARD = "4GB"


def tensor_identity(t: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they are the same view of the same storage (tied weights); views
    of one storage at other offsets (e.g. GPTQ's shared q/k/v scales) differ."""
    if t.device.type == "meta":
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def dedupe_tied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that are the same view of one storage (tied embeddings); loaders re-tie
    from config."""
    seen: set[tuple] = set()
    out = {}
    for name, t in state_dict.items():
        key = tensor_identity(t)
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t
    return out


def dense_state_dict(model: torch.nn.Module, dtype: torch.dtype | None,
                     drop: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """`model`'s state dict without the names in `drop` (replaced by the caller: not cast, so no
    temporary copy of them), its float tensors in `dtype` (None: as they are); tensors that share
    storage (tied embeddings) stay shared, so `dedupe_tied` still writes them once."""
    sd = {k: v for k, v in model.state_dict().items() if k not in drop}
    if dtype is None:
        return sd
    cast: dict[tuple, torch.Tensor] = {}
    for name, t in sd.items():
        if t.is_floating_point() and t.dtype != dtype and t.device.type != "meta":
            sd[name] = cast.setdefault(tensor_identity(t), t.to(dtype))
    return sd


def save_tensors(state_dict: dict[str, torch.Tensor], out: Path) -> list[str]:
    """Write `state_dict` as safetensors shards (with an index when there is more than one)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in dedupe_tied(state_dict).items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in sorted(names)}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)


def write_checkpoint(model: Any, tokenizer: Any, out: Path, state_dict: dict[str, torch.Tensor],
                     quantization_config: dict | None, dtype: torch.dtype | None = None) -> None:
    """Write a loadable checkpoint of `model`'s config with the given tensors into `out`; `dtype`: the
    dtype its unquantized tensors are stored in (config.json's `dtype`)."""
    write_metadata(model, tokenizer, Path(out), quantization_config, dtype)
    save_tensors(state_dict, Path(out))


def write_metadata(model: Any, tokenizer: Any, out: Path, quantization_config: dict | None,
                   dtype: torch.dtype | None = None) -> None:
    """config.json (with `quantization_config`, if any, `architectures`, which vLLM and PaddleFormers
    resolve the model class from: without it they build the model without its head, and `dtype`, the
    dtype engines load it in by default), generation config and tokenizer files."""
    cfg = copy.deepcopy(model.config)
    if dtype is not None:
        cfg.dtype = dtype
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if quantization_config is not None:
        cfg.quantization_config = quantization_config
    if not getattr(cfg, "architectures", None):  # e.g. a model converted from GGUF; engines pick the class by it
        cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
