"""Streaming compression: models larger than RAM, one decoder block in memory at a time.

The model is built from its config with parameters on the meta device (buffers such as rotary
frequencies are real). The pieces outside the blocks (embeddings, final norm, head) are read from the
safetensors files; each block is read, quantized with `engine.quantize_block` (the in-memory path's own
step), written as its own safetensors shard and put back on meta. What every block receives (masks and
rotary embeddings differ per block) comes from one forward of the skeleton in which each block is a
recorder that passes its input through, so no block has to be in memory to learn it.

Everything is written in a work directory beside the output, with a durable checkpoint after each
block (manifest.json: the finished shards and their sha256, the file holding the next block's inputs,
a fingerprint of source, recipe and calibration). Running the same command again continues after the
last finished block, and the output is byte-identical to an uninterrupted run. The output directory
appears by one rename at the end. Calibration activations stay in RAM, or, when two sets do not fit
the activation budget, each block reads its inputs from a file on disk one sample at a time and only
its outputs are held (same output either way).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from frugal.errors import FrugalError
from frugal.load.model import sha256_file
from frugal.compression.preflight import checkpoint_tensors, read_header

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the work directory (manifest.json and activation files)
MANIFEST = "manifest.json"
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
Progress = Callable[[str, int], None]  # (event, block): "block-start", "shard", "checkpoint", "outside", "finish"


# -- files ----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the directory: `path` is whole or absent after a crash."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    _durable_replace(tmp, path)


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write one safetensors shard durably; its sha256."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({n: tensors[n].detach().contiguous() for n in sorted(tensors)}, str(tmp), metadata={"format": "pt"})
    _durable_replace(tmp, path)
    return sha256_file(path)


class SlotWriter:
    """A safetensors file of `n` tensors of one shape, named 00000, 00001, ..., written in order one at a
    time (the header is known in advance); complete and durable under its name only after `close`."""

    def __init__(self, path: Path, n: int, shape: Sequence[int], dtype: torch.dtype):
        self.path, self.n, self.shape, self.dtype, self.next = Path(path), n, tuple(shape), dtype, 0
        size = dtype.itemsize
        for d in shape:
            size *= d
        header = {f"{j:05d}": {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                               "data_offsets": [j * size, (j + 1) * size]} for j in range(n)}
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, j: int, t: torch.Tensor) -> None:
        if j != self.next or tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise FrugalError(f"{self.path}: slot {j} got {tuple(t.shape)} {t.dtype}, expected slot {self.next} "
                              f"{self.shape} {self.dtype}")
        self.f.write(t.detach().contiguous().view(torch.uint8).numpy())
        self.next += 1

    def close(self) -> None:
        self.f.close()
        if self.next != self.n:
            raise FrugalError(f"{self.path}: {self.next} of {self.n} slots written")
        _durable_replace(self.tmp, self.path)


def write_slots(path: Path, tensors: Sequence[torch.Tensor]) -> None:
    """All of `tensors` (one shape and dtype) into a slot file."""
    w = SlotWriter(path, len(tensors), tensors[0].shape, tensors[0].dtype)
    for j, t in enumerate(tensors):
        w.write(j, t)
    w.close()


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


class SlotFile(Sequence):
    """The tensors of a slot file, read one at a time with plain reads (no memory map)."""

    def __init__(self, path: Path):
        path = Path(path)
        header, self.start = read_header(path)
        self.path = path
        self.items = [header[k] for k in sorted(header)]
        end = self.start + (self.items[-1]["data_offsets"][1] if self.items else 0)
        if path.stat().st_size != end:
            raise FrugalError(f"{path}: activation file is truncated ({path.stat().st_size} of {end} bytes)")
        dtypes = {v: k for k, v in ST_DTYPES.items()}
        self.dtype = dtypes[self.items[0]["dtype"]] if self.items else torch.float32

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> torch.Tensor:
        b, e = self.items[j]["data_offsets"]
        return read_tensor(self.path, self.start + b, e - b, self.dtype, self.items[j]["shape"])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(len(self)))


# -- the model without its weights --------------------------------------------------------------
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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
    return model.eval()


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` of `root` (a parameter stays a parameter)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def materialise(root: nn.Module, prefix: str, src: Source) -> None:
    """Read the parameters and persistent buffers of module `root` (full name `prefix`) from the files."""
    names = {n: f"{prefix}.{n}" if prefix else n for n in root.state_dict()}
    tensors = src.read([full for full in names.values() if full in src.tensors])
    for n, full in names.items():
        if full in tensors:
            _set_tensor(root, n, tensors[full])
    missing = [names[n] for n, p in root.named_parameters() if p.is_meta]
    if missing:
        raise FrugalError(f"{src.directory}: tensor {missing[0]} is not in the checkpoint files")


def release(root: nn.Module) -> None:
    """Put every parameter of `root` back on the meta device (frees the block's memory)."""
    for n, p in list(root.named_parameters()):
        _set_tensor(root, n, torch.empty_like(p, device="meta"))
    _trim_heap()


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


def _fixed_mmap_threshold() -> None:
    """Allocations from 1 MB up get their own mapping, returned to the system when freed. By default glibc
    raises this threshold after large frees, so the next block's tensors land on the heap, whose holes
    it keeps: the resident size then grows by about one block per block."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def load_outside(model: nn.Module, blocks_name: str, src: Source) -> None:
    """Read every tensor outside the block list (embeddings, norms, head), then re-tie a tied head."""
    names = [n for n in model.state_dict() if not n.startswith(blocks_name + ".") and n in src.tensors]
    for n, t in src.read(names).items():
        _set_tensor(model, n, t)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(blocks_name + ".")]
    if missing:
        raise FrugalError(f"{src.directory}: tensor {missing[0]} is not in the checkpoint files")


# -- block inputs without running the blocks ------------------------------------------------------
@contextlib.contextmanager
def _forwards(blocks: nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    """Replace each block's forward by make(i) while the context lasts."""
    for i, b in enumerate(blocks):
        b.forward = make(i)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


@torch.no_grad()
def record_calls(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor,
                 sink: Callable[[torch.Tensor], None] | None) -> tuple[tuple, list[dict]]:
    """(positional args after the hidden states, keyword arguments per block) from a forward of the
    first sample in which every block only records its call and passes its input through; with a
    `sink`, block 0's input of every sample, in order, goes to it. No block computes anything."""
    from frugal.compression.hooks import Stop, detach, split_hidden

    calls: list[dict] = [{} for _ in blocks]
    first: dict[str, Any] = {}
    state = {"all": True}

    def make(i: int):
        def forward(*args, **kwargs):
            hidden, rest, kw = split_hidden(args, kwargs)
            if state["all"]:
                calls[i] = detach(kw)
            if i == 0:
                first.setdefault("args", detach(rest))
                if sink is not None:
                    sink(hidden.detach().clone())  # (1, seq, hidden)
            if i == len(blocks) - 1 or not state["all"]:
                raise Stop
            return hidden
        return forward

    with _forwards(blocks, make):
        for j in range(samples.shape[0] if sink is not None else 1):
            state["all"] = j == 0
            try:
                model(samples[j : j + 1], use_cache=False)
            except Stop:
                pass
    return first["args"], calls


def _replay(blocks: nn.ModuleList, outputs: Sequence[torch.Tensor], returns_tuple: bool):
    """Forwards that skip every block, the last one returning the saved outputs sample by sample: the
    model's forward then runs only the pieces outside the blocks, on the quantized blocks' outputs."""
    count = [0]

    def make(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == len(blocks) - 1:
                hidden = outputs[count[0]]
                count[0] += 1
            return (hidden,) if returns_tuple else hidden
        return forward

    return _forwards(blocks, make)


class _Collect:
    """Block inputs as they are recorded: kept in a list, or written to a slot file on disk."""

    def __init__(self, path: Path, n: int, in_ram: bool):
        self.path, self.n, self.in_ram = path, n, in_ram
        self.items: list[torch.Tensor] = []
        self.writer: SlotWriter | None = None

    def __call__(self, t: torch.Tensor) -> None:
        if self.in_ram:
            self.items.append(t)
            return
        if self.writer is None:
            self.writer = SlotWriter(self.path, self.n, t.shape, t.dtype)
        self.writer.write(self.writer.next, t)

    def result(self) -> Sequence[torch.Tensor]:
        if self.in_ram:
            return self.items
        self.writer.close()
        return SlotFile(self.path)


# -- one block ------------------------------------------------------------------------------------
def block_tensors(block: nn.Module, prefix: str, quantized: dict) -> dict[str, torch.Tensor]:
    """The block's output tensors by full name, quantized weights packed as compressed-tensors."""
    from frugal.exporters.compressed_tensors import compressed_state_dict

    rel = {name[len(prefix) + 1:]: qw for name, qw in quantized.items()}
    return {f"{prefix}.{k}": v for k, v in compressed_state_dict(block, rel).items()}


# -- the job ------------------------------------------------------------------------------------------
def _acts_name(i: int) -> str:
    return f"acts-{i:05d}.safetensors"  # the inputs of block i


@dataclass
class _Job:
    src: Source
    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList
    recipe: Any
    work: Path
    manifest: dict
    in_ram: bool
    progress: Progress = field(default=lambda event, block: None)

    @property
    def shard_dir(self) -> Path:
        return self.work / "out"

    def shard_name(self, i: int) -> str:
        """Block i is shard i+1; the pieces outside the blocks are the last shard."""
        n = len(self.blocks) + 1
        return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _run_block(job: _Job, i: int, inputs: Sequence[torch.Tensor] | None, args: tuple, kw: dict):
    """Read, quantize, write and release block i, then checkpoint; its outputs (the next block's inputs)."""
    from frugal.compression.engine import quantize_block

    block, prefix = job.blocks[i], f"{job.blocks_name}.{i}"
    materialise(block, prefix, job.src)
    job.progress("block-start", i)
    acts = job.work / _acts_name(i + 1)

    def note_kind(_mod, _args, output):  # what a block returns decides what the replay returns
        job.manifest["returns_tuple"] = isinstance(output, tuple)

    hook = block.register_forward_hook(note_kind)
    q, reports, out = quantize_block(block, prefix, job.recipe, inputs, args, kw, {})  # inputs None: no calibration
    hook.remove()
    if out is not None:
        write_slots(acts, out)
        if not job.in_ram:
            out = SlotFile(acts)  # the list goes; the next block reads its inputs from disk one at a time
    sha = save_shard(block_tensors(block, prefix, q), job.shard_dir / job.shard_name(i))
    release(block)
    del q
    job.progress("shard", i)
    _checkpoint(job, i, sha, reports, acts if out is not None else None)
    job.progress("checkpoint", i)
    return out


def _checkpoint(job: _Job, i: int, shard_sha: str, reports: dict, acts: Path | None) -> None:
    """Record block i as finished (atomically), then drop the inputs it no longer needs."""
    m = job.manifest
    m["shards"][job.shard_name(i)] = shard_sha
    m["layers"] += [[name, r.to_dict()] for name, r in reports.items()]
    m["inputs"] = acts.name if acts is not None else None
    m["next_block"] = i + 1
    _write_json(job.work / MANIFEST, m)
    (job.work / _acts_name(i)).unlink(missing_ok=True)


def _block_inputs(job: _Job, samples: torch.Tensor) -> tuple[Sequence[torch.Tensor], tuple, list[dict]]:
    """Inputs of the next block to run (recorded, or from the checkpoint) and every block's call arguments."""
    k = job.manifest["next_block"]
    collect = _Collect(job.work / _acts_name(0), samples.shape[0], job.in_ram) if k == 0 else None
    args, calls = record_calls(job.model, job.blocks, samples, collect)
    if collect is not None:
        return collect.result(), args, calls
    saved = SlotFile(job.work / job.manifest["inputs"])
    return (list(saved) if job.in_ram else saved), args, calls


def _run_blocks(job: _Job, samples: torch.Tensor | None) -> Sequence[torch.Tensor] | None:
    """Every block not finished yet, in order; the last block's outputs (None without calibration)."""
    from tqdm.auto import tqdm

    k, n = job.manifest["next_block"], len(job.blocks)
    inputs, args, calls = None, (), [{} for _ in range(n)]
    if samples is not None:
        inputs, args, calls = _block_inputs(job, samples)
    if k:
        log.info("resuming at block %d of %d from %s", k, n, job.work)
    for i in tqdm(range(k, n), initial=k, total=n, desc=f"{job.recipe.method} (streaming)", unit="block"):
        inputs = _run_block(job, i, inputs, args, calls[i])
    return inputs


# -- checkpoint identity ------------------------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(src: Source, recipe: Any, samples: torch.Tensor | None) -> dict[str, str]:
    """sha256 of what decides the output: source files (size, mtime, header), recipe, calibration ids, versions."""
    import compressed_tensors
    import transformers

    from frugal.version import __version__

    files = []
    for name in sorted({t.file for t in src.tensors.values()}):
        path = src.directory / name
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = hashlib.sha256(f.read(n)).hexdigest()
        st = path.stat()
        files.append([name, st.st_size, st.st_mtime_ns, header])
    files.append(["config.json", sha256_file(src.directory / "config.json")])
    calib = "none"
    if samples is not None:
        calib = _sha([list(samples.shape), hashlib.sha256(samples.long().numpy().tobytes()).hexdigest()])
    versions = [__version__, torch.__version__, transformers.__version__, compressed_tensors.__version__,
                FORMAT_VERSION]
    return {"source model": _sha(files), "recipe": _sha(recipe.to_dict()), "calibration": calib,
            "versions": _sha(versions)}


def _fresh(work: Path, fp: dict[str, str], n_blocks: int) -> dict:
    """Empty the work directory (the lock file stays) and start a new manifest."""
    (work / MANIFEST).unlink(missing_ok=True)  # first: a crash below must not leave a checkpoint behind
    for p in work.iterdir():
        if p.name != "lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (work / "out").mkdir()
    return {"format_version": FORMAT_VERSION, "fingerprint": fp, "n_blocks": n_blocks, "next_block": 0,
            "shards": {}, "layers": [], "inputs": None, "returns_tuple": None}


def open_work(work: Path, fp: dict[str, str], n_blocks: int, resume: bool) -> dict:
    """The manifest of an interrupted run to continue (verified), or a fresh one."""
    path = work / MANIFEST
    if not resume or not path.is_file():
        return _fresh(work, fp, n_blocks)
    if not (work / "out").is_dir():  # killed after delivering its output, before cleaning up
        log.info("%s: left over from a finished run; starting fresh", work)
        return _fresh(work, fp, n_blocks)
    m = json.loads(path.read_text())
    changed = [k for k in fp if m.get("fingerprint", {}).get(k) != fp[k]]
    if m.get("format_version") != FORMAT_VERSION or m.get("n_blocks") != n_blocks:
        changed = changed or ["work directory format"]
    if changed:
        raise FrugalError(f"{work}: {', '.join(changed)} changed since the interrupted run; remove {work} "
                          "or pass --no-resume")
    for name, sha in m["shards"].items():
        shard = work / "out" / name
        if not shard.is_file() or sha256_file(shard) != sha:
            raise FrugalError(f"{shard}: checkpointed shard is missing or damaged; remove {work} or pass --no-resume")
    if m["inputs"]:
        SlotFile(work / m["inputs"])  # header and size checked
    return m


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on the work directory (released by the kernel if the process dies)."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / "lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FrugalError(f"{work}: another frugal process is compressing into this output") from None
    try:
        yield
    finally:
        os.close(fd)


# -- the end: pieces outside the blocks, metadata, delivery --------------------------------------
@dataclass
class _Scheme:
    """What `quantization_config` reads of a QuantizedWeight (kept instead of the codes)."""

    bits: int
    group_size: int
    zero_point: Any  # None for symmetric grids


def _quantize_outside(job: _Job, samples: torch.Tensor | None, outputs: Sequence[torch.Tensor] | None):
    """Linear layers outside the blocks (engine.quantize_outside, fed by replaying the last block's outputs)."""
    from frugal.load.blocks import outside_linears
    from frugal.compression.engine import quantize_outside

    quantized, reports = {}, {}
    layers = outside_linears(job.model, job.blocks_name, job.recipe.ignore)
    if layers:
        job.progress("outside", len(job.blocks))
        replay = contextlib.nullcontext()
        if job.recipe.method == "gptq":
            replay = _replay(job.blocks, outputs, bool(job.manifest["returns_tuple"]))
        with replay:
            quantize_outside(job.model, layers, job.recipe, samples, quantized, reports, {})
    return quantized, reports


def _write_index(directory: Path) -> None:
    """model.safetensors.index.json from the shards' headers."""
    weight_map, total = {}, 0
    for shard in sorted(directory.glob("model-*.safetensors")):
        header, _ = read_header(shard)
        for name, h in header.items():
            weight_map[name] = shard.name
            total += h["data_offsets"][1] - h["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_metadata(model: nn.Module, tokenizer: Any, directory: Path, qc: dict) -> None:
    """config.json (with quantization_config), generation config and tokenizer, as export.hf writes them."""
    from frugal.exporters.hf import write_metadata

    write_metadata(model, tokenizer, directory, qc)


def _finish(job: _Job, samples, outputs, tokenizer, report_args: tuple) -> None:
    """Outside layers, the last shard, index, config, tokenizer and frugal.json, all in the work directory."""
    from frugal.compression.result import CompressionReport, layer_reports
    from frugal.exporters.compressed_tensors import compressed_state_dict, quantization_config
    from frugal.exporters.hf import dedupe_tied

    quantized, outside_reports = _quantize_outside(job, samples, outputs)
    prefix = job.blocks_name + "."
    sd = {k: v for k, v in compressed_state_dict(job.model, quantized).items() if not k.startswith(prefix)}
    save_shard(dedupe_tied(sd), job.shard_dir / job.shard_name(len(job.blocks)))
    _write_index(job.shard_dir)
    reports = {**layer_reports(dict(job.manifest["layers"])), **outside_reports}
    schemes = {n: _Scheme(r.bits, r.group_size, None if r.symmetric else True) for n, r in reports.items()}
    linears = [n for n, m in job.model.named_modules() if isinstance(m, nn.Linear)]
    _write_metadata(job.model, tokenizer, job.shard_dir, quantization_config(schemes, linears))
    report = CompressionReport(job.recipe, *report_args, layers=reports)
    (job.shard_dir / "frugal.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    job.progress("finish", len(job.blocks))


def _deliver(built: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory to `out` in one rename (an existing `out` only with `overwrite`)."""
    from frugal.atomic import publish_modes, replace_dir

    if out.exists() and not overwrite:
        raise FrugalError(f"{out}: output already exists (pass --overwrite to replace it)")
    publish_modes(built)
    replace_dir(built, out)
    _fsync_dir(out.parent)


# -- entry points -----------------------------------------------------------------------------------
def model_directory(spec: Any) -> tuple[Path, Path]:
    """(directory with config.json + safetensors, what the user named)."""
    from frugal.load.model import _check_weights, gguf_to_hf, resolve

    source = resolve(spec)
    directory = source
    if source.is_file():
        if source.suffix != ".gguf":
            raise FrugalError(f"{source}: streaming needs a model directory (safetensors) or a .gguf file")
        log.warning("%s: a GGUF file is dequantized whole, once (cached); streaming starts from that copy", source)
        directory = gguf_to_hf(source)
    _check_weights(directory, allow_pickle=False)
    return directory, source


def _check_job(recipe: Any, calibration: Any) -> None:
    """Refuse what streaming cannot do, before any work."""
    if recipe.gguf_type:
        raise FrugalError(f"recipe.gguf_type={recipe.gguf_type}: streaming writes compressed-tensors; GGUF targets "
                          "need the in-memory path")
    if recipe.rotation.kind != "none":
        raise FrugalError("recipe.rotation: rotations transform the whole model at once; use the in-memory path")
    if recipe.refine.enabled:
        raise FrugalError("recipe.refine: refinement carries the float model's activations beside the quantized "
                          "ones; use the in-memory path")
    if calibration is False or calibration == "data-free":
        raise FrugalError("--data-free: streaming cannot generate calibration text (the model is never whole in "
                          "memory); pass --calib FILE")


def _tokenizer(directory: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        log.warning("%s: no usable tokenizer (%s)", directory, str(e).splitlines()[0][:120])
        return None


def _activations_in_ram(directory: Path, recipe: Any, samples: torch.Tensor | None, budget: int | None) -> bool:
    """Keep calibration activations in RAM? Two sets (a block's inputs and outputs) must fit `budget`
    (bytes); without a budget, the whole streaming job must fit the RAM available now. Otherwise the
    inputs are read from disk and only the outputs are held."""
    from frugal.compression.preflight import available_ram_bytes, estimate

    if samples is None:
        return True
    est = estimate(directory, recipe, samples.shape[0], samples.shape[1])
    fits = est.peak_ram_bytes <= available_ram_bytes() if budget is None else 2 * est.activation_bytes <= budget
    if not fits:
        log.info("calibration activations (2 x %.2f GB) kept on disk", est.activation_bytes / 1e9)
    return fits


def compress_streaming(model: Any = None, recipe: Any = None, out: str | Path = "out/stream", calibration: Any = None,
                       *, overwrite: bool = False, resume: bool = True, activation_budget: int | None = None,
                       progress: Progress | None = None) -> Path:
    """Compress `model` (directory, .gguf file or None for the default) into a compressed-tensors directory
    `out`, one decoder block in memory at a time; the same quantized tensors and frugal.json as
    `frugal.compress(...).save(out)`. An interrupted run with the same arguments continues (`resume`)."""
    from frugal.calibrate import for_recipe
    from frugal.compression.plan import check_plan
    from frugal.config import as_recipe
    from frugal.atomic import check_output_dir
    from frugal.load.blocks import find_blocks

    recipe = as_recipe(recipe)
    _check_job(recipe, calibration)
    _fixed_mmap_threshold()
    directory, source = model_directory(model)
    out = check_output_dir(out, overwrite)
    src = Source(directory)
    skeleton = build_skeleton(directory)
    blocks_name, blocks = find_blocks(skeleton)
    check_plan(skeleton, recipe, ("compressed-tensors",))
    tokenizer = _tokenizer(directory)
    torch.manual_seed(recipe.seed)
    samples, calib_info = for_recipe(calibration, tokenizer, None, recipe)
    in_ram = _activations_in_ram(directory, recipe, samples, activation_budget)
    work = out.parent / f".{out.name}.stream-work"
    with _locked(work):
        manifest = open_work(work, fingerprint(src, recipe, samples), len(blocks), resume)
        load_outside(skeleton, blocks_name, src)
        job = _Job(src, skeleton, blocks_name, blocks, recipe, work, manifest, in_ram, progress or (lambda e, b: None))
        outputs = _run_blocks(job, samples)
        _finish(job, samples, outputs, tokenizer, (str(source), calib_info))
        _deliver(job.shard_dir, out, overwrite)
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s", out)
    return out


def _parse_recipe(text: str | None) -> Any:
    from frugal.config import Recipe

    if text is None:
        return Recipe()
    if text.lstrip().startswith("{"):
        try:
            return Recipe.from_dict(json.loads(text))
        except ValueError as e:
            raise FrugalError(f"--recipe: not valid JSON ({e})") from None
    return Recipe.load(text)


def main(argv: list[str] | None = None) -> int:
    """`python -m frugal.compression.stream MODEL -o OUT [--recipe FILE|JSON] ...`: streaming compression without the CLI."""
    import argparse

    from frugal.compression.preflight import decide, peak_rss_bytes

    ap = argparse.ArgumentParser(prog="python -m frugal.compression.stream", description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--recipe", help="recipe file (.yaml/.json) or inline JSON")
    ap.add_argument("--calib", help="calibration text file (default: shared wikitext-2 valid.txt)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-resume", action="store_true", help="discard an interrupted run's checkpoint")
    ap.add_argument("--activation-budget", type=int, help="bytes of RAM for calibration activations (0: on disk)")
    ap.add_argument("--force", action="store_true", help="run even when the pre-flight estimate does not fit")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = _parse_recipe(a.recipe)
        mode, est = decide(model_directory(a.model)[0], recipe, a.output, stream=True, force=a.force)
        budget = 0 if mode == "stream-offload" and a.activation_budget is None else a.activation_budget
        compress_streaming(a.model, recipe, a.output, a.calib, overwrite=a.overwrite, resume=not a.no_resume,
                           activation_budget=budget)
    except FrugalError as e:
        print(f"frugal: error: {e}", file=sys.stderr)
        return 2
    need = est.offload_ram_bytes if budget == 0 else est.peak_ram_bytes
    log.info("peak RSS %.1f MB (pre-flight estimate %.1f MB)", peak_rss_bytes() / 1e6, need / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
