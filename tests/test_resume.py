"""Kill-and-resume of streaming compression: a run SIGKILLed at a random point continues from its last
checkpoint and writes the very bytes of an uninterrupted run; a changed recipe or source, a damaged
checkpoint or a second process are refused in one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import dir_digest

RECIPE = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 3, "seq_len": 32}}
BLOCKS = 5
# per block: block-start, shard, checkpoint; then finish (llama: nothing outside the blocks to quantize)
EVENTS = 3 * BLOCKS + 1

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from frugal.compression.stream import compress_streaming

    src, out, recipe, kill_at, budget = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    count = [0]

    def progress(event, block):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    ids = torch.randint(3, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    compress_streaming(src, recipe, out, ids, progress=progress, activation_budget=None if budget == "ram" else 0)
""")


def _ids() -> torch.Tensor:
    return torch.randint(3, 512, (3, 32), generator=torch.Generator().manual_seed(0))  # as in CHILD


def _run_child(src: Path, out: Path, kill_at: int, budget: str) -> int:
    cmd = [sys.executable, "-c", CHILD, str(src), str(out), json.dumps(RECIPE), str(kill_at), budget]
    return subprocess.run(cmd, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def model_and_reference(tiny_model_factory, tmp_path_factory):
    from frugal.compression.stream import compress_streaming

    src = tiny_model_factory("llama", num_hidden_layers=BLOCKS)
    ref = compress_streaming(str(src), RECIPE, tmp_path_factory.mktemp("ref") / "out", _ids())
    return src, dir_digest(ref)


def test_sigkill_at_random_points_then_resume_is_byte_identical(model_and_reference, tmp_path):
    """Two SIGKILLs at seeded random events (the second run resumes and is killed again, with the
    activations on disk this time), then a third run finishes: same bytes as the uninterrupted run."""
    from frugal.compression.stream import compress_streaming

    src, reference = model_and_reference
    out, work = tmp_path / "out", tmp_path / ".out.stream-work"
    rng = random.Random(6)
    first = rng.randrange(1, EVENTS + 1)
    assert _run_child(src, out, first, "ram") == -signal.SIGKILL
    assert not out.exists() and work.is_dir()
    done = json.loads((work / "manifest.json").read_text())["next_block"] if (work / "manifest.json").exists() else 0
    # the resumed run emits events only for the blocks it still runs: kill it a few events in
    second = rng.randrange(1, 3 * (BLOCKS - done) + 1)
    assert _run_child(src, out, second, "disk") == -signal.SIGKILL
    assert not out.exists()
    compress_streaming(str(src), RECIPE, out, _ids())
    assert dir_digest(out) == reference
    assert not work.exists()


def _interrupted(src: Path, out: Path, at_block: int, recipe: dict = RECIPE) -> None:
    """Leave a checkpoint behind: fail (as a crash would) right after block `at_block` is checkpointed."""
    from frugal.compression.stream import compress_streaming

    def progress(event, block):
        if event == "checkpoint" and block == at_block:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        compress_streaming(str(src), recipe, out, _ids(), progress=progress)


def test_changed_recipe_or_source_refuses_to_resume(model_and_reference, tmp_path):
    from frugal.errors import FrugalError
    from frugal.compression.stream import compress_streaming

    src, reference = model_and_reference
    out = tmp_path / "out"
    _interrupted(src, out, 1)
    other = {**RECIPE, "weights": {"bits": 3, "group_size": 32}}
    with pytest.raises(FrugalError, match=r"\.out\.stream-work: recipe changed since the interrupted run; remove .* "
                                          "or pass --no-resume"):
        compress_streaming(str(src), other, out, _ids())
    with pytest.raises(FrugalError, match="calibration changed"):
        compress_streaming(str(src), RECIPE, out, _ids().flip(0))
    shard = next(src.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    try:
        with pytest.raises(FrugalError, match="source model changed"):
            compress_streaming(str(src), RECIPE, out, _ids())
    finally:
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns - 10**9))
    compress_streaming(str(src), RECIPE, out, _ids())  # the same job continues
    assert dir_digest(out) == reference


def test_no_resume_starts_over(model_and_reference, tmp_path):
    """--no-resume discards a checkpoint even when it belongs to another recipe."""
    from frugal.compression.stream import compress_streaming

    src, reference = model_and_reference
    _interrupted(src, tmp_path / "out", 2, {**RECIPE, "weights": {"bits": 8, "group_size": 32}})
    compress_streaming(str(src), RECIPE, tmp_path / "out", _ids(), resume=False)
    assert dir_digest(tmp_path / "out") == reference


def test_damaged_checkpoint_is_refused(model_and_reference, tmp_path):
    from frugal.errors import FrugalError
    from frugal.compression.stream import compress_streaming

    src, _ = model_and_reference
    out = tmp_path / "out"
    _interrupted(src, out, 1)
    shard = tmp_path / ".out.stream-work" / "out" / "model-00002-of-00006.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FrugalError, match="model-00002-of-00006.safetensors: checkpointed shard is missing or damaged"):
        compress_streaming(str(src), RECIPE, out, _ids())


def test_second_process_is_refused(model_and_reference, tmp_path):
    import fcntl

    from frugal.errors import FrugalError
    from frugal.compression.stream import compress_streaming

    src, _ = model_and_reference
    work = tmp_path / ".out.stream-work"
    work.mkdir()
    with open(work / "lock", "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FrugalError, match="another frugal process is compressing into this output"):
            compress_streaming(str(src), RECIPE, tmp_path / "out", _ids())
