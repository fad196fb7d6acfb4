"""Careless-user cases of issue 17, each reproduced: the source model can never be replaced, deleted or
written into (in memory, streamed, exported, evaluated; through symlinks too), and options that cannot
work are refused before any work with one line naming them."""

from __future__ import annotations

import os

import torch

import pytest

from test_cli_errors import assert_clean_error, run_cli, tree

FAST = ("--method", "rtn", "--group-size", "32", "--no-eval")


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    return src, tree(src)


@pytest.mark.parametrize("where", ["same", "inside", "symlink", "parent"])
@pytest.mark.parametrize("stream", [False, True])
def test_output_that_is_inside_or_holds_the_input_is_refused(model, tmp_path, where, stream):
    """`-o <input> --overwrite` (or a directory inside it, a symlink to it, or its parent) exits non-zero
    with one line naming the output, and the input is byte for byte what it was."""
    src, before = model
    out = {"same": src, "inside": src / "q", "parent": src.parent}.get(where)
    if where == "symlink":
        out = tmp_path / "link"
        os.symlink(src, out)
    proc = run_cli("compress", src, "-o", out, "--overwrite", *FAST, "--stream" if stream else "--no-stream")
    line = assert_clean_error(proc, out)
    assert "input" in line
    assert tree(src) == before


def test_api_refuses_saving_over_the_source(model):
    import frugal
    from frugal.errors import FrugalError

    src, before = model
    res = frugal.compress(str(src), {"method": "rtn", "weights": {"group_size": 32}})
    with pytest.raises(FrugalError, match="the output is the input"):
        res.save(src, overwrite=True)
    with pytest.raises(FrugalError, match="the output is inside the input"):
        frugal.compress(str(src), {"method": "rtn", "weights": {"group_size": 32}}, out=src / "x")
    assert tree(src) == before


def test_export_and_eval_do_not_write_over_their_inputs(model, tmp_path):
    src, before = model
    comp = tmp_path / "c"
    assert run_cli("compress", src, "-o", comp, *FAST).returncode == 0
    comp_before = tree(comp)
    assert_clean_error(run_cli("export", comp, "--format", "gguf", "-o", comp, "--overwrite"), comp)
    assert_clean_error(run_cli("eval", comp, "--ref", src, "-o", src, "--eval-tokens", "64", "--seq-len", "32"), src)
    assert tree(comp) == comp_before and tree(src) == before


def _poison(src, name: str = "model.embed_tokens.weight") -> None:
    """Put one NaN into tensor `name` of the model's safetensors file."""
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    sd = load_file(str(f))
    sd[name][0, 0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"])
@pytest.mark.parametrize("stream", [False, True])
def test_nan_in_any_tensor_is_refused_in_every_path(tiny_model_dir, tmp_path, tensor, stream):
    """A NaN in the embedding (outside the blocks) or in a block is one error line naming the tensor, in
    memory (at load) and streamed (when its block is read: the blocks before it show their progress);
    no output and no work directory are left."""
    src = tiny_model_dir("llama")
    _poison(src, tensor)
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    proc = run_cli("compress", src, "-o", out, *FAST, "--stream" if stream else "--no-stream")
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("frugal: error")]
    assert len(errors) == 1 and tensor in errors[0] and "NaN" in errors[0] and "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_disk_full_while_streaming_names_what_is_kept(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A full disk under --stream: one line naming the output, the failed write and the work directory
    kept for a resume; the same command afterwards resumes and finishes."""
    import errno

    from frugal.cli.main import main
    from frugal.compression import stream

    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    args = ["compress", str(src), "-o", str(out), "--stream", *FAST]
    real = stream.save_shard
    calls = [0]

    def full_after_one(tensors, path):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path)

    monkeypatch.setattr(stream, "save_shard", full_after_one)
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("frugal: error")]
    work = tmp_path / ".out.stream-work"
    assert len(err) == 1 and "No space left on device" in err[0] and str(work) in err[0] and "resume" in err[0]
    assert "1 of 2 finished blocks" in err[0] and work.is_dir() and not out.exists()
    monkeypatch.setattr(stream, "save_shard", real)
    assert main(args) == 0 and out.is_dir() and not work.exists()


def test_lost_race_for_the_output_leaves_no_model_behind(tiny_model_dir, tmp_path, monkeypatch):
    """Two streamed runs for the same -o: the one that finds the output taken when it delivers is refused
    and its complete-looking work directory is removed."""
    import frugal
    from frugal.compression import stream
    from frugal.errors import FrugalError

    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    real = stream._deliver

    def other_run_wins(built, target, overwrite):
        target.mkdir()  # another process delivered first
        (target / "config.json").write_text("{}\n")
        return real(built, target, overwrite)

    monkeypatch.setattr(stream, "_deliver", other_run_wins)
    with pytest.raises(FrugalError, match="work directory removed"):
        frugal.compress(str(src), {"method": "rtn", "weights": {"group_size": 32}}, stream=True, out=out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert (out / "config.json").read_text() == "{}\n"


@pytest.mark.parametrize("args,names", [
    (("--calib-len", "100000", "--method", "gptq", "--no-eval"), ["--calib-len 100000", "context of 128"]),
    (("--seq-len", "512"), ["--seq-len 512", "context of 128"]),
    (("--eval-tokens", "0"), ["--eval-tokens 0"]),
    (("--seq-len", "1"), ["--seq-len 1"]),
])
def test_impossible_lengths_are_refused_before_any_work(tiny_model_dir, tmp_path, args, names):
    """--calib-len past the model's context, --eval-tokens 0: one line, before compressing."""
    src = tiny_model_dir("llama", max_position_embeddings=128)
    out = tmp_path / "out"
    proc = run_cli("compress", src, "-o", out, "--group-size", "32", *args)
    assert_clean_error(proc, *names)
    assert not out.exists() and "block" not in proc.stderr  # no block was compressed


def test_eval_ref_with_another_vocabulary(tiny_model_dir, tmp_path):
    """`frugal eval --ref` with a model of another vocabulary: one line naming both, no traceback."""
    a = tiny_model_dir("llama")
    b = tiny_model_dir("llama", vocab_size=600)
    proc = run_cli("eval", a, "--ref", b, "--eval-tokens", "64", "--seq-len", "32")
    assert_clean_error(proc, str(a), "vocabulary")


def test_rounding_in_place_leaves_the_source_files_unchanged(tiny_model_dir):
    """Rounding (and AWQ's folding, the storage rounding) write into the loaded weights, which are a
    private copy-on-write map of the source's safetensors file: the file keeps every byte."""
    import hashlib

    import frugal

    src = tiny_model_dir("llama")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(src.iterdir()) if p.is_file()}
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    res = frugal.compress(str(src), {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "awq": {"enabled": True},
                                     "calibration": {"num_samples": 4, "seq_len": 32}}, ids)
    assert res.quantized
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(src.iterdir()) if p.is_file()}
