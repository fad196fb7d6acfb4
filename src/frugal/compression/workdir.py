"""The streaming engine's work directory: durable files (fsync + rename), activation slot files, and the
manifest that makes an interrupted run resumable (fingerprint of what decides the output, finished
shards with their sha256, the file holding the next block's inputs), guarded by an exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from frugal.compression.preflight import read_header
from frugal.errors import FrugalError
from frugal.load.lazy import TORCH_DTYPES, read_tensor
from frugal.load.model import sha256_file
from frugal.version import __version__

if TYPE_CHECKING:
    from frugal.load.lazy import Source

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the work directory (manifest.json and activation files)
MANIFEST = "manifest.json"
ST_DTYPES = {dtype: code for code, dtype in TORCH_DTYPES.items()}  # torch dtype -> safetensors code


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
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
        self.dtype = TORCH_DTYPES[self.items[0]["dtype"]] if self.items else torch.float32

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> torch.Tensor:
        b, e = self.items[j]["data_offsets"]
        return read_tensor(self.path, self.start + b, e - b, self.dtype, self.items[j]["shape"])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(len(self)))


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(src: "Source", recipe: Any, samples: torch.Tensor | None) -> dict[str, str]:
    """sha256 of what decides the output: source files (size, mtime, header), recipe, calibration ids, versions."""
    import compressed_tensors
    import transformers


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
def locked(work: Path) -> Iterator[None]:
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
