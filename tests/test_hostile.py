"""Hostile and broken input through the CLI (`frugal.cli.main.main`, in process): each case ends with exit
code 2, one `frugal: error:` line naming the file, layer or block at fault, and no output written
(no output directory, no temporary directory beside it, an existing output left as it was).

tests/test_cli_errors.py covers the simpler cases (missing path, truncated safetensors, pickle refused
by `compress`, bad recipe, existing output) with the CLI in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CALIB_TEXT, dir_digest
from frugal.cli.main import main


def run(capsys, *args) -> tuple[int, str]:
    """Exit code and the one error line of `frugal ARGS` (fails on a traceback or several errors)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [part for line in err.split("\n") for part in line.split("\r") if part.startswith("frugal:")]
    assert len(errors) <= 1, err
    return code, errors[0] if errors else ""


def assert_nothing_written(parent: Path) -> None:
    assert list(parent.iterdir()) == [], f"left behind: {sorted(p.name for p in parent.iterdir())}"


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path / "run" / "out"


def _edit_weights(model: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(model / "model.safetensors"))
    edit(sd)
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ pickle


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("cmd", [["info"], ["eval", "--eval-tokens", "64", "--seq-len", "32"]])
def test_pickle_is_never_unpickled(capsys, tmp_path, tiny_model_dir, cmd):
    """A pickle-only model is refused by every command before any byte of it is unpickled."""
    model = tiny_model_dir("llama")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    weights = model / "pytorch_model.bin"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    code, line = run(capsys, cmd[0], model, *cmd[1:])
    assert code == 2 and str(weights) in line and "--allow-pickle" in line, line
    assert not marker.exists()


# -------------------------------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("tensor, value", [("model.layers.1.self_attn.k_proj.weight", float("nan")),
                                           ("model.layers.0.input_layernorm.weight", float("inf"))])
def test_non_finite_weight_names_the_tensor(capsys, tiny_model_dir, out, tensor, value):
    model = tiny_model_dir("llama")
    _edit_weights(model, lambda sd: sd[tensor].view(-1).__setitem__(3, value))
    code, line = run(capsys, "compress", model, "-o", out, "--no-eval", "--method", "rtn", "--group-size", "32")
    assert code == 2 and tensor in line and "NaN/Inf" in line, line
    assert_nothing_written(out.parent)


def _overflowing_model(tiny_model_dir) -> Path:
    """Finite weights whose activations overflow float32 in block 0 (attention output ~1e39)."""
    model = tiny_model_dir("llama")
    _edit_weights(model, lambda sd: sd["model.layers.0.self_attn.o_proj.weight"].fill_(3e38))
    return model


def _gptq_args(model: Path, out: Path) -> list:
    return ["compress", model, "-o", out, "--no-eval", "--method", "gptq", "--group-size", "32",
            "--samples", "2", "--calib-len", "32", "--calib", CALIB_TEXT]


def test_inf_activations_name_the_block(capsys, tiny_model_dir, out):
    code, line = run(capsys, *_gptq_args(_overflowing_model(tiny_model_dir), out))
    assert code == 2 and "model.layers.0." in line, line
    assert_nothing_written(out.parent)


def test_inf_activations_are_called_nan_or_inf(capsys, tiny_model_dir, out):
    code, line = run(capsys, *_gptq_args(_overflowing_model(tiny_model_dir), out))
    assert code == 2 and re.search(r"\bNaN\b|\bInf\b", line), line


# ------------------------------------------------------------------------------- calibration, config


def test_calibration_text_too_short(capsys, tmp_path, tiny_model_dir, out):
    model = tiny_model_dir("llama")
    text = tmp_path / "short.txt"
    text.write_text("Once upon a time.\n")
    args = _gptq_args(model, out)
    code, line = run(capsys, *args[:-1], text)
    assert code == 2 and str(text) in line and "tokens" in line, line
    assert_nothing_written(out.parent)


@pytest.mark.parametrize("config, expect", [
    ({"model_type": "frobnicator"}, "unknown architecture model_type='frobnicator'"),
    ({"model_type": "vit"}, "not a causal language model"),
    ({}, "no model_type"),
    ([1, 2], "not a JSON object"),
    ({"model_type": "llama", "quantization_config": "gptq"}, "quantization_config is not a JSON object"),
])
def test_unknown_or_malformed_config(capsys, tiny_model_dir, config, expect):
    model = tiny_model_dir("llama")
    if isinstance(config, dict) and config.get("model_type") == "llama":
        config = {**json.loads((model / "config.json").read_text()), **config}
    (model / "config.json").write_text(json.dumps(config))
    code, line = run(capsys, "info", model)
    assert code == 2 and str(model / "config.json") in line and expect in line, line


def test_checkpoint_missing_a_weight(capsys, tiny_model_dir):
    """transformers would initialise a missing weight at random and only log it; frugal refuses."""
    model = tiny_model_dir("llama")
    _edit_weights(model, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    code, line = run(capsys, "info", model)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in line and "lacks" in line, line


# ------------------------------------------------------------------------------- hostile weight files


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _safetensors(header: dict, data_size: int) -> bytes:
    raw = json.dumps(header).encode()
    return _u64(len(raw)) + raw + bytes(data_size)


@pytest.mark.parametrize("data, expect", [
    (_u64(2**64 - 1) + b"{}", "exceeds the 100000000-byte limit"),
    (_safetensors({}, 4), "data section is 4 bytes, the tensors cover 0"),
    (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8), "overlap"),
    (_safetensors({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, 8),
     "holds more elements than the file has bits"),
], ids=["header-length", "trailing-bytes", "overlap", "huge-shape"])
def test_hostile_safetensors(capsys, tiny_model_dir, data, expect):
    model = tiny_model_dir("llama")
    weights = model / "model.safetensors"
    weights.write_bytes(data)
    code, line = run(capsys, "info", model)
    assert code == 2 and str(weights) in line and expect in line, line


def test_index_pointing_outside_the_model(capsys, tiny_model_dir):
    model = tiny_model_dir("llama")
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../../elsewhere.safetensors"}}))
    code, line = run(capsys, "info", model)
    assert code == 2 and str(index) in line and "inside the model directory" in line, line


@pytest.mark.parametrize("data, expect", [
    (b"", "truncated GGUF file"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "GGUF version 1 is not supported"),
    (b"GGUF" + (3).to_bytes(4, "little") + _u64(0) + _u64(2**63), "more than its 24 bytes can hold"),
    (b"GGUF" + (3).to_bytes(4, "little") + _u64(0) + _u64(1) + _u64(2**40) + bytes(16), "key 0 needs 1099511627776 bytes"),
], ids=["empty", "magic", "version", "key-count", "key-length"])
def test_hostile_gguf(capsys, tmp_path, data, expect):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    code, line = run(capsys, "info", path)
    assert code == 2 and str(path) in line and expect in line, line


# ---------------------------------------------------------------------------------------- full disk


def _rtn_args(model: Path, out: Path, *extra) -> list:
    return ["compress", model, "-o", out, "--no-eval", "--method", "rtn", "--group-size", "32", *extra]


def test_disk_full_in_native_writer(capsys, monkeypatch, tiny_model_dir, out):
    """The safetensors writer (Rust) reports ENOSPC as text; half a file has been written by then."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    model = tiny_model_dir("llama")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    nested = out.parent / "new" / "deeper" / "out"  # the directories frugal creates go too
    code, line = run(capsys, *_rtn_args(model, nested))
    assert code == 2 and str(nested) in line and "disk full" in line and "nothing was written" in line, line
    assert_nothing_written(out.parent)


def test_disk_full_keeps_the_existing_output(capsys, monkeypatch, tiny_model_dir, out):
    """With --overwrite, a write that fails midway leaves the previous output byte for byte."""
    model = tiny_model_dir("llama")
    assert main([str(a) for a in _rtn_args(model, out)]) == 0
    before = dir_digest(out)
    real_write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name == "frugal.json":
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, line = run(capsys, *_rtn_args(model, out, "--overwrite", "--bits", "3"))
    assert code == 2 and str(out) in line and "the existing output is unchanged" in line, line
    assert dir_digest(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_real_write_failure_from_file_size_limit(capsys, tiny_model_dir, out):
    """A real failed write (EFBIG from a 100 kB file size limit) inside the native safetensors writer."""
    import resource
    import signal

    model = tiny_model_dir("llama")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        code, line = run(capsys, *_rtn_args(model, out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2 and str(out) in line and "File too large" in line, line
    assert_nothing_written(out.parent)


def test_interrupt_mid_write(capsys, monkeypatch, tiny_model_dir, out):
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    model = tiny_model_dir("llama")
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    assert main([str(a) for a in _rtn_args(model, out)]) == 130
    assert "frugal: interrupted" in capsys.readouterr().err
    assert_nothing_written(out.parent)


def test_import_stays_light():
    code = ("import sys, frugal, frugal.load.validate, frugal.atomic, frugal.load.model; "
            "heavy = {'torch', 'transformers', 'gguf', 'numpy', 'safetensors'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_write_text_atomic_on_full_disk(monkeypatch, tmp_path):
    """The one-file writer (for `frugal eval --json`): a failed write leaves the old file and no temporary."""
    from frugal import atomic
    from frugal.errors import FrugalError

    path = tmp_path / "results.json"
    atomic.write_text_atomic(path, "old\n")
    real_fdopen = atomic.os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: FullFile(real_fdopen(fd, *a, **k)))
    with pytest.raises(FrugalError, match="cannot write .No space left on device.; it was left as it was"):
        atomic.write_text_atomic(path, "new and longer\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(FrugalError, match="cannot write"):
        atomic.write_text_atomic(tmp_path / "missing" / "x.json", "{}")


# ----------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("extra", [[], ["--format", "gguf"], ["--stream"]], ids=["ct", "gguf", "stream"])
def test_outputs_are_readable_by_others(tmp_path, tiny_model_dir, out, extra):
    """Outputs get the modes a plain open() gives under the umask (safetensors writes owner-only files and
    temporary directories are 0700): a serving process running as another user can read them."""
    model = tiny_model_dir("llama")
    old = os.umask(0o022)
    try:
        assert main([str(a) for a in _rtn_args(model, out, *extra)]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert any(name.endswith((".safetensors", ".gguf")) for name in modes), modes
    wrong = {n: oct(m) for n, m in modes.items() if m != (0o755 if (out / n).is_dir() else 0o644)}
    assert not wrong, wrong
