"""Fuzzing the weight-file readers: valid safetensors and GGUF files, mutated (truncated, bytes flipped,
lengths and counts replaced by huge or overflowing values, random JSON headers), must end in a
FrugalError or load. Never another exception, never more memory than the file's size, never slow.

Stronger than "no crash": whenever frugal.load.validate accepts a file, the library behind it (safetensors,
gguf-py) must read every tensor of it without error, so our checks are at least as strict as theirs.

CI runs a fixed (derandomized) set of examples in well under a minute; FRUGAL_FUZZ_EXAMPLES=5000 runs
more locally (each test scales its own count from that number).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugal.errors import FrugalError
from frugal.load import model as loader
from frugal.load.model import load_model
from frugal.load.validate import check_gguf, check_safetensors

EXAMPLES = int(os.environ.get("FRUGAL_FUZZ_EXAMPLES", "0"))
LOCAL = EXAMPLES > 0


def fuzz(ci_examples: int, scale: float = 1.0):
    """Derandomized in CI (same examples every run), no example database written to disk."""
    n = max(1, int(EXAMPLES * scale)) if LOCAL else ci_examples
    return settings(max_examples=n, deadline=None if LOCAL else 5000, derandomize=not LOCAL, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Values that break naive readers when written over a length, count or offset.
U64_EDGES = [0, 1, 7, 8, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def mutated(draw, data: bytes, hot: int) -> bytes:
    """`data` after one to four mutations, most of them within the first `hot` bytes (the header)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        end = len(out) if draw(st.booleans()) and draw(st.booleans()) else min(hot, len(out))
        pos = draw(st.integers(0, max(0, end - 1)))
        kind = draw(st.sampled_from(["truncate", "flip", "byte", "u64", "u32", "insert", "delete"]))
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and out:
            out[pos] = draw(st.integers(0, 255))
        elif kind in ("u64", "u32"):
            value = draw(st.sampled_from(U64_EDGES + [len(data), len(data) + 1, len(data) - 8]))
            size = 8 if kind == "u64" else 4
            out[pos : pos + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
    return bytes(out)


def _bounded_memory(check, path: Path) -> object:
    """Run `check(path)`; fail if it allocated more than a few times the file's size."""
    tracemalloc.start()
    try:
        return check(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        limit = 4 * path.stat().st_size + (2 << 20)
        assert peak <= limit, f"{check.__name__} allocated {peak} bytes for a {path.stat().st_size}-byte file"


def _agrees(path: Path, check, read) -> None:
    """`check(path)` (memory-bounded) ends in a one-line FrugalError naming the file, or its header is of
    a file that `read(path, header)`, the library behind the format, reads completely."""
    try:
        header = _bounded_memory(check, path)
    except FrugalError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    read(path, header)


def _fuzz_file(path: Path, data: bytes, check, read, load=None) -> None:
    """`data` written to `path` holds `_agrees`; then `load()` (what load_model runs before transformers),
    where given, ends in a FrugalError or returns."""
    path.write_bytes(data)
    _agrees(path, check, read)
    if load is not None:
        try:
            load()
        except FrugalError:
            pass


# ------------------------------------------------------------------------------------------ safetensors


def _valid_safetensors() -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).half(),
               "c": torch.arange(4).reshape(2, 2), "d.bias": torch.randn(2, 3, generator=g).bfloat16(),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(7, dtype=torch.uint8)}
    return save(tensors, metadata={"format": "pt", "note": "fuzz"})


SAFETENSORS = _valid_safetensors()
SAFETENSORS_HOT = 8 + int.from_bytes(SAFETENSORS[:8], "little")


def _read_safetensors(path: Path, header: dict) -> None:
    """The safetensors library reads every tensor of the file, the same names as `header`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(header)
        for k in f.keys():
            f.get_tensor(k)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="frugal-fuzz-") as d:
        (Path(d) / "config.json").write_text(json.dumps({"model_type": "llama"}))
        yield Path(d)


def test_valid_safetensors_passes(scratch):
    path = scratch / "model.safetensors"
    path.write_bytes(SAFETENSORS)
    header = check_safetensors(path)
    assert header["a.weight"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": header["a.weight"]["data_offsets"]}
    assert header["scalar"]["shape"] == [] and len(header) == 6


@fuzz(300)
@given(data=mutated(SAFETENSORS, SAFETENSORS_HOT))
def test_fuzz_mutated_safetensors(scratch, data):
    _fuzz_file(scratch / "model.safetensors", data, check_safetensors, _read_safetensors,
               load=lambda: loader.check_weights(scratch, allow_pickle=False))


JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
JSON = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12)
DIM = st.sampled_from([0, 1, 2, 3, 4, 7, 2**31, 2**63, 2**64, -1]) | st.integers(0, 6)
ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F4", "F6_E2M3", "F8_E4M3", "X", "f32"]),
    "shape": st.lists(DIM, max_size=4) | JSON,
    "data_offsets": st.lists(st.integers(0, 64) | st.sampled_from(U64_EDGES + [-1]), min_size=0, max_size=3) | JSON,
})


@st.composite
def random_safetensors(draw) -> bytes:
    """A safetensors file with a made-up JSON header (plausible tensor entries or any JSON) and data."""
    header = draw(st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4) | JSON)
    if isinstance(header, dict) and draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | JSON)
    raw = json.dumps(header, allow_nan=True).encode()
    raw += b" " * draw(st.integers(0, 7))
    length = draw(st.sampled_from([len(raw)] * 6 + U64_EDGES))
    return struct.pack("<Q", length % 2**64) + raw + draw(st.binary(max_size=96))


@fuzz(300)
@given(data=random_safetensors())
def test_fuzz_random_safetensors_headers(scratch, data):
    _fuzz_file(scratch / "model.safetensors", data, check_safetensors, _read_safetensors)


@st.composite
def consistent_safetensors(draw) -> bytes:
    """Headers whose offsets are mostly right, so that some files are valid and the checks past the
    offsets (overlap, gaps, dtype sizes, sub-byte rows) get exercised."""
    from frugal.load.validate import SAFETENSORS_BITS

    header, pos = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        n = int(np.prod(shape)) * SAFETENSORS_BITS[dtype] // 8
        begin = pos + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n]}
        pos = begin + n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(max(0, pos + draw(st.sampled_from([0, 0, 0, 1, -1]))))


@fuzz(200)
@given(data=consistent_safetensors())
def test_fuzz_nearly_valid_safetensors(scratch, data):
    _fuzz_file(scratch / "model.safetensors", data, check_safetensors, _read_safetensors)


# ------------------------------------------------------------------------------------------------ GGUF


def _valid_gguf() -> bytes:
    import gguf

    g = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_uint32("test.count", 7)
        w.add_string("general.name", "fuzz")
        w.add_bool("test.flag", True)
        w.add_float32("test.eps", 1e-5)
        w.add_int64("test.big", -(2**40))
        w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", "déf"])
        w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0, 3.0])
        w.add_tensor("token_embd.weight", g.standard_normal((4, 8)).astype(np.float32))
        w.add_tensor("blk.0.attn_q.weight", g.standard_normal((2, 16)).astype(np.float16))
        q8 = g.integers(0, 256, size=(2, 34), dtype=np.uint8)  # two Q8_0 blocks of 32 values
        w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


GGUF = _valid_gguf()


def check_gguf_bytes(data: bytes):
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return check_gguf(f.name)


GGUF_HOT = check_gguf_bytes(GGUF).data_offset  # metadata and tensor descriptions end here


def _read_gguf(path: Path, header) -> None:
    """gguf-py reads the whole file, with the same layout as `header`."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    for f in reader.fields.values():
        f.contents()
    assert [t.name for t in reader.tensors] == [t.name for t in header.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors):
        assert header.data_offset + ours.offset == theirs.data_offset and ours.nbytes == theirs.n_bytes
        assert len(theirs.data.tobytes()) == ours.nbytes  # every byte of the tensor is readable


def test_valid_gguf_agrees_with_gguf_py(scratch):
    path = scratch / "m.gguf"
    path.write_bytes(GGUF)
    header = check_gguf(path)
    assert header.version == 3 and header.alignment == 32 and header.data_offset % 32 == 0
    assert [(t.name, t.ggml_type, t.dims) for t in header.tensors] == [
        ("token_embd.weight", "F32", (8, 4)), ("blk.0.attn_q.weight", "F16", (16, 2)),
        ("blk.0.ffn_up.weight", "Q8_0", (32, 2))]
    _agrees(path, check_gguf, _read_gguf)


@fuzz(400)
@given(data=mutated(GGUF, GGUF_HOT))
def test_fuzz_mutated_gguf(scratch, data):
    path = scratch / "m.gguf"
    _fuzz_file(path, data, check_gguf, _read_gguf, load=lambda: loader.check_gguf(path))


@st.composite
def gguf_counts(draw) -> bytes:
    """The valid file with its version, tensor count or key count replaced (including big-endian forms)."""
    out = bytearray(GGUF)
    field = draw(st.sampled_from([(4, 4), (8, 8), (16, 8)]))  # (offset, size): version, tensors, keys
    value = draw(st.sampled_from(U64_EDGES) | st.integers(0, 40))
    order = draw(st.sampled_from(["little", "big"]))
    out[field[0] : field[0] + field[1]] = (value % 2 ** (8 * field[1])).to_bytes(field[1], order)
    return bytes(out[: draw(st.sampled_from([len(out), len(out) // 2, GGUF_HOT, 24]))])


def _tensor_fields() -> list[tuple[int, int]]:
    """(offset, size) of every dimension, type and data offset in the valid file's tensor descriptions."""
    fields = []
    for t in check_gguf_bytes(GGUF).tensors:
        pos = GGUF.index(t.name.encode()) + len(t.name)
        n_dims = int.from_bytes(GGUF[pos : pos + 4], "little")
        fields += [(pos + 4 + 8 * i, 8) for i in range(n_dims)]
        fields += [(pos + 4 + 8 * n_dims, 4), (pos + 8 + 8 * n_dims, 8)]  # GGML type, data offset
    return fields


@st.composite
def gguf_tensor_fields(draw) -> bytes:
    """The valid file with one tensor's dimension, GGML type or data offset changed."""
    out = bytearray(GGUF)
    for _ in range(draw(st.integers(1, 2))):
        pos, size = draw(st.sampled_from(_tensor_fields()))
        value = draw(st.integers(0, 70) | st.sampled_from(U64_EDGES + [GGUF_HOT, len(GGUF)]))
        out[pos : pos + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    return bytes(out)


@fuzz(200)
@given(data=gguf_tensor_fields())
def test_fuzz_gguf_tensor_descriptions(scratch, data):
    _fuzz_file(scratch / "m.gguf", data, check_gguf, _read_gguf)


@fuzz(100)
@given(data=gguf_counts())
def test_fuzz_gguf_counts(scratch, data):
    _fuzz_file(scratch / "m.gguf", data, check_gguf, _read_gguf)


def test_gguf_huge_counts_refused_fast(scratch):
    """A header claiming 2**64-1 keys must be refused from the file size, not by trying to read them."""
    path = scratch / "m.gguf"
    path.write_bytes(GGUF[:16] + (2**64 - 1).to_bytes(8, "little") + GGUF[24:])
    with pytest.raises(FrugalError, match="more than its"):
        check_gguf(path)
    string_len = GGUF.index(b"general.architecture") - 8  # the first key's length field
    path.write_bytes(GGUF[:string_len] + (2**63).to_bytes(8, "little") + GGUF[string_len + 8 :])
    with pytest.raises(FrugalError, match="truncated GGUF file"):
        check_gguf(path)


@pytest.mark.parametrize("offset, message", [(0, "overlap"), (33, "not a multiple of 32"),
                                             (2**64 - 32, "beyond the")])
def test_gguf_tensor_layout_refused(offset, message):
    """What gguf-py would read without complaint but llama.cpp refuses: overlapping or misaligned data."""
    pos, size = _tensor_fields()[7]  # the data offset of the second tensor (4 fields per 2-d tensor)
    assert int.from_bytes(GGUF[pos : pos + size], "little") == 128  # F32 (8, 4) before it: 128 bytes
    with pytest.raises(FrugalError, match=message):
        check_gguf_bytes(GGUF[:pos] + offset.to_bytes(8, "little") + GGUF[pos + 8 :])


def test_not_a_regular_file_is_refused(scratch):
    """A FIFO named like a weight file would block a reader forever; it is refused before opening."""
    fifo = scratch / "pipe.safetensors"
    os.mkfifo(fifo)
    try:
        with pytest.raises(FrugalError, match="not a regular file"):
            check_safetensors(fifo)
        with pytest.raises(FrugalError, match="not a regular file"):
            check_gguf(fifo)
    finally:
        fifo.unlink()


# ------------------------------------------------------------------------------------ load_model end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, shared):
    from conftest import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("fuzz-model"))


@fuzz(12, scale=0.02)
@given(data=st.data())
def test_fuzz_load_model(tiny_dir, data):
    """The whole loader (our checks, safetensors, transformers) on a model whose weights file is mutated."""
    weights = tiny_dir / "model.safetensors"
    original = weights.read_bytes()
    hot = 8 + int.from_bytes(original[:8], "little")
    weights.write_bytes(data.draw(mutated(original, hot)))
    try:
        load_model(tiny_dir)
    except FrugalError as e:
        assert "\n" not in str(e)
    finally:
        weights.write_bytes(original)
