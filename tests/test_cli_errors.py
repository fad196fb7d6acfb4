"""The `frugal` command as a user runs it (a subprocess): every user mistake ends with a non-zero exit,
exactly one `frugal: error:` line naming the culprit, and nothing written; the happy path prints
the before/after table."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EVAL_TEXT

CLI = [sys.executable, "-m", "frugal.cli.main"]  # cli.py ends with `if __name__ == "__main__"`


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in `cwd` (default: the test's private working directory, checked by conftest)."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or os.getcwd(), env=os.environ.copy())


def stderr_lines(err: str) -> list[str]:
    """The lines a terminal would show: a progress bar redrawn with \\r counts as one line."""
    shown = []
    for raw in err.split("\n"):
        parts = [p for p in raw.split("\r") if p.strip()]
        if parts:
            shown.append(parts[-1])
    return shown


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones included) with a hash of its content ('dir' for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def assert_clean_error(proc: subprocess.CompletedProcess, *names: str | Path) -> str:
    """Non-zero exit and exactly one stderr line, `frugal: error: ...`, mentioning every name."""
    assert proc.returncode != 0, f"exit 0 for a bad input; stdout:\n{proc.stdout}"
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("frugal: error:"), line
    for name in names:
        assert str(name) in line, f"error does not name {name!r}: {line}"
    return line


@pytest.fixture
def workspace(tmp_path):
    """Inputs under tmp_path/in; outputs requested at tmp_path/run/out (run/ starts empty)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "run").mkdir()
    return tmp_path


def _check_untouched(workspace: Path, before: dict[str, str]) -> None:
    after = tree(workspace)
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert (created, removed, changed) == ([], [], []), "a failed command changed the file system"


def _compress_fails(workspace: Path, model: Path | str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = workspace / "run" / "out"
    before = tree(workspace)
    proc = run_cli("compress", model, "-o", out, "--no-eval", *extra)
    _check_untouched(workspace, before)
    assert not out.exists()
    return proc, out


def test_missing_path(workspace):
    missing = workspace / "in" / "no-such-model"
    proc, _ = _compress_fails(workspace, missing)
    assert_clean_error(proc, missing)


def test_config_without_weights(workspace, tiny_model_dir):
    src = tiny_model_dir("llama")
    model = workspace / "in" / "no-weights"
    model.mkdir()
    (model / "config.json").write_bytes((src / "config.json").read_bytes())
    proc, _ = _compress_fails(workspace, model)
    line = assert_clean_error(proc, model)
    assert "weights" in line


def test_truncated_safetensors(workspace, tiny_model_dir):
    model = tiny_model_dir("llama")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    proc, _ = _compress_fails(workspace, model)
    assert_clean_error(proc, weights)


def test_recipe_with_unknown_key(workspace, tiny_model_dir):
    model = tiny_model_dir("llama")
    recipe = workspace / "in" / "recipe.json"
    recipe.write_text(json.dumps({"method": "rtn", "weights": {"bits": 4, "bitz": 3}}))
    proc, _ = _compress_fails(workspace, model, "--recipe", str(recipe))
    assert_clean_error(proc, recipe, "bitz")


def _pickle_model(src: Path, dest: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    dest.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dest / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(src / "model.safetensors")), dest / "pytorch_model.bin")
    return dest


def test_pickle_checkpoint_directory_refused(workspace, tiny_model_dir):
    model = _pickle_model(tiny_model_dir("llama"), workspace / "in" / "pickled")
    proc, _ = _compress_fails(workspace, model)
    line = assert_clean_error(proc, model / "pytorch_model.bin")
    assert "--allow-pickle" in line


def test_pickle_checkpoint_file_refused(workspace, tiny_model_dir):
    model = _pickle_model(tiny_model_dir("llama"), workspace / "in" / "pickled")
    proc, _ = _compress_fails(workspace, model / "pytorch_model.bin")
    line = assert_clean_error(proc, model / "pytorch_model.bin")
    assert "--allow-pickle" in line


@pytest.fixture(scope="module")
def group_size_misfit(tmp_path_factory, tiny_model_factory):
    """One run shared by the two tests below: hidden 96, so q_proj's 96 inputs are not a multiple
    of --group-size 64, while 32 divides every width (96 and 192)."""
    ws = tmp_path_factory.mktemp("group-size")
    for sub in ("in", "run", "cwd"):
        (ws / sub).mkdir()
    model = tiny_model_factory("llama", hidden_size=96, num_attention_heads=6, intermediate_size=192)
    before = tree(ws)
    proc = run_cli("compress", model, "-o", ws / "run" / "out", "--no-eval", "--method", "rtn",
                   "--group-size", "64", "--strict-groups", cwd=ws / "cwd")
    return proc, before, ws


def test_group_size_that_does_not_fit(group_size_misfit):
    """The error names the layer and lists the group sizes that do fit."""
    proc, before, ws = group_size_misfit
    _check_untouched(ws, before)
    assert proc.returncode != 0
    errors = [l for l in stderr_lines(proc.stderr) if l.startswith("frugal: error:")]
    assert len(errors) == 1, proc.stderr
    assert "model.layers.0.self_attn.q_proj" in errors[0]
    fits = errors[0].split("fit every layer:")[-1]
    assert "32" in fits and "-1" in fits and "64" not in fits and "128" not in fits, errors[0]


def test_group_size_that_does_not_fit_is_one_line(group_size_misfit):
    proc, _, _ = group_size_misfit
    assert_clean_error(proc, "model.layers.0.self_attn.q_proj")


def test_output_under_a_regular_file(workspace, tiny_model_dir):
    model = tiny_model_dir("llama")
    blocker = workspace / "run" / "a-file"
    blocker.write_text("not a directory\n")
    before = tree(workspace)
    proc = run_cli("compress", model, "-o", blocker / "out", "--no-eval", "--method", "rtn", "--group-size", "32")
    _check_untouched(workspace, before)
    assert_clean_error(proc, blocker)


def test_existing_output_without_overwrite(workspace, tiny_model_dir):
    model = tiny_model_dir("llama")
    out = workspace / "run" / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data\n")
    before = tree(workspace)
    proc = run_cli("compress", model, "-o", out, "--no-eval", "--method", "rtn", "--group-size", "32")
    _check_untouched(workspace, before)  # out/ untouched, no hidden .out.tmp-* beside it
    line = assert_clean_error(proc, out)
    assert "--overwrite" in line


@pytest.mark.parametrize("cmd", ["eval", "compress"])
def test_empty_eval_text_is_refused_before_work(workspace, tiny_model_dir, cmd):
    """`eval --text` of blank lines, and `compress --text` of an empty file, fail in one line naming it."""
    model = tiny_model_dir("llama")
    text = workspace / "in" / "empty.txt"
    text.write_text("\n  \n" if cmd == "eval" else "")
    args = (("eval", model, "--text", text, "--json", workspace / "run" / "results.json") if cmd == "eval" else
            ("compress", model, "-o", workspace / "run" / "out", "--method", "rtn", "--group-size", "32", "--text", text))
    before = tree(workspace)
    proc = run_cli(*args)
    _check_untouched(workspace, before)
    line = assert_clean_error(proc, text)
    assert cmd == "compress" or "empty" in line


def test_compress_happy_path_prints_table(workspace, tiny_model_dir, shared):
    model = tiny_model_dir("llama")
    out = workspace / "run" / "out"
    proc = run_cli("compress", model, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", out,
                   "--eval-tokens", "256", "--seq-len", "64", "--text", EVAL_TEXT)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "KL" in proc.stdout, proc.stdout
    assert "frugal: error" not in proc.stderr
    assert (out / "frugal.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (workspace / "run").iterdir()) == ["out"]  # no hidden temp dirs left
    ppl = next(l for l in proc.stdout.splitlines() if l.startswith("perplexity")).split()
    assert float(ppl[1]) > 1 and float(ppl[2]) > 1, ppl
    tokens = next(l for l in proc.stdout.splitlines() if l.startswith("evaluated tokens")).split()
    assert tokens[2] == tokens[3], tokens  # the same tokens scored for both models


def test_info_lists_layers(tiny_model_dir):
    model = tiny_model_dir("llama")
    proc = run_cli("info", model)
    assert proc.returncode == 0, proc.stderr
    assert "q_proj" in proc.stdout and "down_proj" in proc.stdout, proc.stdout


def test_eval_missing_model(workspace, tiny_model_dir):
    ref = tiny_model_dir("llama")
    missing = workspace / "in" / "no-such-model"
    before = tree(workspace)
    proc = run_cli("eval", missing, "--ref", ref, "--eval-tokens", "128", "--seq-len", "64")
    _check_untouched(workspace, before)
    assert_clean_error(proc, missing)


def test_eval_unreadable_model(workspace, tiny_model_dir):
    model = tiny_model_dir("llama")
    weights = model / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    out = workspace / "run" / "report"
    before = tree(workspace)
    proc = run_cli("eval", model, "-o", out, "--eval-tokens", "128", "--seq-len", "64")
    _check_untouched(workspace, before)
    assert_clean_error(proc, weights)
