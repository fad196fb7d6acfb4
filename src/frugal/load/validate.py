"""Strict checks of untrusted weight files (safetensors, GGUF) before any library reads them.

Every length or count taken from a file is compared with what the file's size can hold before it is
used, so a hostile header cannot make us allocate, seek or loop beyond the file. Each problem is one
FrugalError line, "<file>: <what is wrong>". The checks are at least as strict as the libraries that
read the files afterwards (safetensors, gguf-py), so a file that passes here does not crash them.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugal.errors import FrugalError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
MAX_DIM = 2**63 - 1  # both formats store sizes as 64-bit integers
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS

# safetensors dtype -> bits per element. F6_* are valid headers, but torch cannot hold them.
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
}

# GGUF value types (spec numbering) -> struct format of a scalar; 8 = string, 9 = array.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_DEFAULT_ALIGNMENT = 32


def _regular_file(path: Path) -> int:
    """Size of `path`, which must be a regular file (a FIFO or device could block or never end)."""
    if not path.is_file():
        raise FrugalError(f"{path}: not a regular file")
    return path.stat().st_size


def _bad(path: Path, what: str) -> FrugalError:
    return FrugalError(f"{path}: {what}")


# ----------------------------------------------------------------------------------------- safetensors


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup[:80]!r}")
    return d


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the size of the data section that follows it."""
    size = _regular_file(path)
    if size < 8:
        raise _bad(path, f"truncated safetensors file ({size} bytes, the header length alone takes 8)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # (u64 little-endian) header length
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"safetensors header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise _bad(path, f"truncated safetensors file (header of {n} bytes, only {size - 8} follow)")
        raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, "file shrank while being read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise _bad(path, "safetensors header is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"safetensors header is not valid JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"safetensors header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numel(path: Path, name: str, shape: Any, limit: int) -> int:
    """Element count of `shape`; refuses a shape with more than `limit` elements before multiplying on."""
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise _bad(path, f"tensor {name!r}: shape must be a list of non-negative 64-bit integers")
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > limit:
            raise _bad(path, f"tensor {name!r}: shape {shape[:8]} holds more elements than the file has bits")
    return numel


def _tensor_span(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes in the data section, checked against its dtype and shape."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        raise _bad(path, f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
    bits = SAFETENSORS_BITS[dtype]
    shape = entry["shape"]
    numel = _numel(path, name, shape, 8 * data_size)
    if (numel * bits) % 8 or (bits < 8 and shape and (shape[-1] * bits) % 8):
        raise _bad(path, f"tensor {name!r}: {dtype} rows of shape {shape[:8]} do not end on a byte boundary")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _bad(path, f"tensor {name!r}: data_offsets must be two integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} are not 0 <= begin <= end")
    if end > data_size:
        raise _bad(path, f"truncated safetensors file: tensor {name!r} needs data bytes {begin}..{end}, "
                         f"the file holds {data_size}")
    if end - begin != numel * bits // 8:
        raise _bad(path, f"tensor {name!r}: {end - begin} bytes for {numel} {dtype} values "
                         f"(expected {numel * bits // 8})")
    return begin, end


def check_safetensors(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Check a safetensors file's header; return its tensor entries (name -> dtype, shape, data_offsets).

    The tensors must tile the data section exactly, in some order: no overlap, no gap, nothing after.
    """
    path = Path(path)
    header, data_size = _read_safetensors_header(path)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    spans = sorted((_tensor_span(path, name, entry, data_size), name) for name, entry in header.items())
    covered, prev = 0, None
    for (begin, end), name in spans:
        if begin < covered:
            raise _bad(path, f"tensors {prev!r} and {name!r} overlap")
        if begin > covered:
            raise _bad(path, f"data bytes {covered}..{begin} belong to no tensor")
        covered, prev = end, name
    if covered != data_size:
        raise _bad(path, f"data section is {data_size} bytes, the tensors cover {covered}")
    return header


def check_safetensors_index(directory: str | os.PathLike) -> None:
    """A sharded model's index must map tensor names to shard files inside `directory` that exist."""
    index = Path(directory) / "model.safetensors.index.json"
    if not index.exists():
        return
    _regular_file(index)
    if index.stat().st_size > MAX_HEADER_BYTES:
        raise _bad(index, f"larger than {MAX_HEADER_BYTES} bytes")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        raise _bad(index, "not a JSON object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _bad(index, "weight_map must map tensor names to file names")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise _bad(index, f"shard {shard[:80]!r} is not a .safetensors file name inside the model directory")
        if not (Path(directory) / shard).is_file():
            raise _bad(index, f"shard {shard} is missing")


# ------------------------------------------------------------------------------------------------ GGUF


class _Reader:
    """Sequential reads from a read-only memory map that never go past the end of the file."""

    def __init__(self, path: Path, buf, order: str = "<"):
        self.path, self.buf, self.size, self.pos, self.order = path, buf, len(buf), 0, order

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise _bad(self.path, f"truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                                  f"{self.left} remain")

    def bytes(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def scalar(self, fmt: str, what: str) -> Any:
        fmt = self.order + fmt
        self.need(struct.calcsize(fmt), what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"length of {what}")
        try:
            return self.bytes(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(self.path, f"{what} at offset {self.pos - n} is not UTF-8") from None


@dataclass
class GGUFTensor:
    name: str
    ggml_type: str
    dims: tuple[int, ...]  # ne[0] first (GGUF order: innermost dimension first)
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    data_offset: int
    keys: dict[str, int] = field(default_factory=dict)  # key -> GGUF value type
    tensors: list[GGUFTensor] = field(default_factory=list)


def _gguf_value(r: _Reader, key: str, vtype: int) -> Any:
    """Read (or skip) one value of type `vtype`; scalars and strings are returned, arrays as None."""
    if vtype in GGUF_SCALARS:
        return r.scalar(GGUF_SCALARS[vtype], f"value of {key!r}")
    if vtype == GGUF_STRING:
        return r.string(f"value of {key!r}")
    if vtype != GGUF_ARRAY:
        raise _bad(r.path, f"key {key!r}: unknown GGUF value type {vtype}")
    itype = r.scalar("I", f"array type of {key!r}")
    count = r.scalar("Q", f"array length of {key!r}")
    if itype in GGUF_SCALARS:
        r.skip(count * struct.calcsize(GGUF_SCALARS[itype]), f"{count} array items of {key!r}")
    elif itype == GGUF_STRING:
        r.need(8 * count, f"{count} strings of {key!r}")  # each string has at least its length
        for i in range(count):
            r.string(f"string {i} of {key!r}")
    else:
        raise _bad(r.path, f"key {key!r}: arrays of GGUF value type {itype} are not supported")
    return None


def _gguf_kv(r: _Reader, count: int) -> tuple[dict[str, int], int]:
    """The key -> value type map of `count` metadata pairs, and the tensor data alignment."""
    keys: dict[str, int] = {}
    alignment = GGUF_DEFAULT_ALIGNMENT
    for i in range(count):
        key = r.string(f"key {i}")
        if key in keys:
            raise _bad(r.path, f"key {key[:80]!r} appears twice")
        keys[key] = vtype = r.scalar("I", f"type of {key!r}")
        value = _gguf_value(r, key, vtype)
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                raise _bad(r.path, f"general.alignment must be a power of two stored as uint32, got {value!r}")
            alignment = value
    return keys, alignment


def _gguf_tensor_info(r: _Reader, i: int, sizes: dict[int, tuple[str, int, int]]) -> GGUFTensor:
    """One tensor description: name, dims, GGML type and data offset (not yet checked against the file)."""
    name = r.string(f"name of tensor {i}")
    n_dims = r.scalar("I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_GGUF_DIMS:
        raise _bad(r.path, f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_GGUF_DIMS})")
    dims = tuple(r.scalar("Q", f"dimensions of {name!r}") for _ in range(n_dims))
    raw_type = r.scalar("I", f"type of {name!r}")
    offset = r.scalar("Q", f"data offset of {name!r}")
    if raw_type not in sizes:
        raise _bad(r.path, f"tensor {name!r}: unknown GGML type {raw_type}")
    type_name, block, type_size = sizes[raw_type]
    numel = 1
    for d in dims:
        numel *= d
    if any(d > MAX_DIM for d in dims) or numel > MAX_DIM:
        raise _bad(r.path, f"tensor {name!r}: dimensions {dims} overflow 64 bits")
    if dims[0] % block:
        raise _bad(r.path, f"tensor {name!r}: {type_name} rows need a multiple of {block} values, got {dims[0]}")
    return GGUFTensor(name, type_name, dims, offset, numel // block * type_size)


def _ggml_sizes() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, values per block, bytes per block), from gguf-py's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def _gguf_preamble(r: _Reader) -> tuple[int, int, int]:
    """Magic, version and byte order; returns (version, tensor count, key count)."""
    r.need(24, "the GGUF preamble (magic, version, counts)")
    if r.bytes(4, "magic") != b"GGUF":
        raise _bad(r.path, "not a GGUF file (magic bytes are not 'GGUF')")
    raw = r.bytes(4, "version")
    version = int.from_bytes(raw, "little")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        r.order, version = ">", int.from_bytes(raw, "big")
    if version not in (2, 3):
        raise _bad(r.path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.scalar("Q", "tensor count"), r.scalar("Q", "key count")
    # A key takes at least 13 bytes (length, type, one-byte value), a tensor description 24.
    if 13 * n_kv + 24 * n_tensors > r.left:
        raise _bad(r.path, f"header claims {n_tensors} tensors and {n_kv} keys, more than its "
                           f"{r.size} bytes can hold")
    return version, n_tensors, n_kv


def _check_gguf_data(path: Path, tensors: list[GGUFTensor], alignment: int, data_size: int) -> None:
    """Every tensor's bytes aligned, inside the data section, and apart from every other tensor's."""
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise _bad(path, f"tensor {t.name[:80]!r} appears twice")
        seen.add(t.name)
        if t.offset % alignment:
            raise _bad(path, f"tensor {t.name!r}: data offset {t.offset} is not a multiple of {alignment}")
        if t.offset + t.nbytes > data_size:
            raise _bad(path, f"tensor {t.name!r}: bytes {t.offset}..{t.offset + t.nbytes} lie beyond the "
                             f"{data_size}-byte data section")
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise _bad(path, f"tensors {a!r} and {b!r} overlap")


def check_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Check a GGUF file's header (metadata and tensor descriptions) against the file; return a summary."""
    path = Path(path)
    size = _regular_file(path)
    if size < 24:
        raise _bad(path, f"truncated GGUF file ({size} bytes; magic, version and counts take 24)")
    sizes = _ggml_sizes()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(path, buf)
        version, n_tensors, n_kv = _gguf_preamble(r)
        keys, alignment = _gguf_kv(r, n_kv)
        r.need(24 * n_tensors, f"{n_tensors} tensor descriptions")
        tensors = [_gguf_tensor_info(r, i, sizes) for i in range(n_tensors)]
    data_offset = -(-r.pos // alignment) * alignment
    data_size = max(0, size - data_offset)
    if tensors and data_offset > size:
        raise _bad(path, f"truncated GGUF file: tensor data would start at {data_offset}, the file has {size} bytes")
    _check_gguf_data(path, tensors, alignment, data_size)
    return GGUFHeader(version, r.order, alignment, data_offset, keys, tensors)
