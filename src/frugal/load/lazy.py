"""A model directory's weights without loading them: the architecture built on the meta device, tensors
read one by one from the safetensors files with plain reads (no memory map), modules filled and
emptied again. The streaming engine holds one decoder block in memory at a time this way.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from frugal.compression.preflight import DTYPE_CODES, checkpoint_tensors, read_header
from frugal.errors import FrugalError
from frugal.load.finite import check_finite
from frugal.load.experts import checkpoint_expert_tensors, expert_groups, from_checkpoint, is_expert_tensor
from frugal.load.linears import TransposedLinear, as_linears

log = logging.getLogger(__name__)


def read_tensor(path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor stored raw (little-endian) at `offset` of a file, read with a plain read: no memory map,
    so the file's pages never count against the process."""
    buf = bytearray(nbytes)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != nbytes:
            raise FrugalError(f"{path}: truncated ({nbytes} bytes expected at offset {offset})")
    t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
    return t.reshape(tuple(shape))


TORCH_DTYPES = {code: getattr(torch, name) for name, code in DTYPE_CODES.items()}  # safetensors code -> dtype


class Source:
    """A model directory's safetensors tensors (one file or shards), read one by one on demand."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.tensors = checkpoint_tensors(self.directory)
        files = {t.file for t in self.tensors.values()}
        self._start = {f: read_header(self.directory / f)[1] for f in files}  # where each file's data begins

    def read(self, names: Sequence[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """name -> tensor; floating tensors in `dtype` (as `load_model` loads them)."""
        out = {}
        for n in names:
            info = self.tensors[n]
            path = self.directory / info.file
            if info.dtype not in TORCH_DTYPES:
                raise FrugalError(f"{path}: tensor {n} has dtype {info.dtype}, which frugal cannot read")
            b, e = info.offsets
            t = read_tensor(path, self._start[info.file] + b, e - b, TORCH_DTYPES[info.dtype], info.shape)
            check_finite(t, n, self.directory)  # as load_model does for every weight
            out[n] = t.to(dtype) if t.is_floating_point() else t
        return out


def build_skeleton(directory: Path) -> nn.Module:
    """The model of `directory`'s config: parameters on the meta device, buffers real, float32, eval mode."""
    import transformers
    from accelerate import init_empty_weights

    try:
        cfg = transformers.AutoConfig.from_pretrained(directory)
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        if (directory / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    except Exception as e:
        reason = str(e).splitlines()[0][:200]
        raise FrugalError(f"{directory}: transformers cannot build this model ({reason})") from None
    as_linears(model)  # MoE experts unfused, Conv1D as linear layers: materialise reads them in place
    return model.eval()


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` of `root` (a parameter stays a parameter)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def _set_from_checkpoint(root: nn.Module, name: str, t: torch.Tensor) -> None:
    """set_tensor of a checkpoint tensor: a Conv1D's (in, out) weight transposed into its TransposedLinear."""
    owner = root.get_submodule(name.rpartition(".")[0])
    if isinstance(owner, TransposedLinear) and name.rpartition(".")[2] == "weight":
        t = t.t().contiguous()
    set_tensor(root, name, t)


def _materialise_experts(model: nn.Module, prefix: str, root: nn.Module, src: Source, groups: list[str]) -> None:
    """The unfused MoE experts `groups` under `prefix` from the checkpoint's own expert tensors (load.experts)."""
    if not groups:
        return
    wanted = checkpoint_expert_tensors(model, groups)
    absent = [n for n in wanted if n not in src.tensors]
    if absent:
        raise FrugalError(f"{src.directory}: tensor {absent[0]} is not in the checkpoint files")
    for full, t in from_checkpoint(model, src.read(wanted), groups).items():
        set_tensor(root, full[len(prefix) + 1:], t)


def stored_name(model: nn.Module, name: str, like: torch.Tensor, src: Source) -> str:
    """The name under which the checkpoint stores the model's tensor `name`: itself, or the name transformers'
    conversion mapping renames from (Mixtral's `block_sparse_moe.gate` is the model's `mlp.gate`)."""
    if name in src.tensors:
        return name
    from transformers.core_model_loading import revert_weight_conversion

    try:
        found = list(revert_weight_conversion(model, {name: torch.empty(like.shape, device="meta")}))
    except Exception:  # no mapping for this family, or one that needs real data: the name as it is
        return name
    return found[0] if len(found) == 1 and found[0] in src.tensors else name


def materialise(root: nn.Module, prefix: str, src: Source, model: nn.Module | None = None) -> None:
    """Read the parameters and persistent buffers of module `root` (full name `prefix`) from the files;
    `model` (the whole skeleton) lays out MoE experts, which the checkpoint stores under its own names, and
    finds tensors the checkpoint stores under an older name."""
    state = root.state_dict()
    every = expert_groups(model) if model is not None else {}
    groups = [g for g in every if g.startswith(prefix + ".")]
    names = {}
    for n, t in state.items():
        full = f"{prefix}.{n}" if prefix else n
        if not is_expert_tensor(full, every):
            names[n] = stored_name(model, full, t, src) if model is not None else full
    tensors = src.read([stored for stored in names.values() if stored in src.tensors])
    for n, stored in names.items():
        if stored in tensors:
            _set_from_checkpoint(root, n, tensors[stored])
    _materialise_experts(model, prefix, root, src, groups)
    missing = [f"{prefix}.{n}" if prefix else n for n, p in root.named_parameters() if p.is_meta]
    if missing:
        raise FrugalError(f"{src.directory}: tensor {missing[0]} is not in the checkpoint files")


def release(root: nn.Module) -> None:
    """Put every parameter of `root` back on the meta device (frees the block's memory)."""
    for n, p in list(root.named_parameters()):
        set_tensor(root, n, torch.empty_like(p, device="meta"))
    trim_heap()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def fixed_mmap_threshold() -> None:
    """Allocations from 1 MB up get their own mapping, returned to the system when freed. By default glibc
    raises this threshold after large frees, so the next block's tensors land on the heap, whose holes
    it keeps: the resident size then grows by about one block per block."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def load_outside(model: nn.Module, blocks_name: str, src: Source) -> None:
    """Read every tensor outside the block list (embeddings, norms, head), then re-tie a tied head."""
    names = {n: stored_name(model, n, t, src) for n, t in model.state_dict().items()
             if not n.startswith(blocks_name + ".")}
    tensors = src.read([s for s in names.values() if s in src.tensors])
    for n, stored in names.items():
        if stored in tensors:
            _set_from_checkpoint(model, n, tensors[stored])
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(blocks_name + ".")]
    if missing:
        raise FrugalError(f"{src.directory}: tensor {missing[0]} is not in the checkpoint files")
