"""Outputs appear whole or not at all: write into a hidden temporary directory, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from frugal.errors import FrugalError


def check_not_source(out: str | Path, sources: Iterable[Any] = ()) -> None:
    """Refuse an output that is, is inside or contains one of the `sources` (model directories or files,
    symlinks followed): replacing it would delete the input."""
    target = Path(out).absolute().resolve()
    for s in sources:
        if s is None or not isinstance(s, (str, os.PathLike)) or not os.path.lexists(s):
            continue
        src = Path(s).absolute().resolve()
        if target == src or src in target.parents:
            where = "is" if target == src else "is inside"
            raise FrugalError(f"{out}: the output {where} the input {s}; write it to another directory")
        if target in src.parents:
            raise FrugalError(f"{out}: the output contains the input {s} (replacing it would delete the input); "
                              f"write it to another directory")


def check_output_dir(out: str | Path, overwrite: bool, sources: Iterable[Any] = ()) -> Path:
    """Refuse, before any work is done, an existing output unless `overwrite`, and an output that is, is
    inside or contains one of the inputs `sources`."""
    out = Path(out)
    check_not_source(out, sources)
    if out.exists() and not overwrite:
        raise FrugalError(f"{out}: output already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise FrugalError(f"{out}: exists and is not a directory")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FrugalError(f"{out}: cannot be created, {parent} is a file")
    if parent is not None and not os.access(parent, os.W_OK):
        raise FrugalError(f"{out}: cannot be created, {parent} is not writable")
    return out


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_code(e: BaseException) -> int | None:
    """The errno of an OSError, or of an I/O error a native writer reports as text ("... (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return int(m.group(1)) if m else None


def _write_error(out: Path, tmp: Path, e: BaseException, existed: bool) -> FrugalError | None:
    """One line for a write that failed (full disk, quota, file size limit, permissions), else None."""
    code = os_error_code(e)
    if code is None:
        return None
    inside = getattr(e, "filename", None) is None or str(tmp) in str(e.filename)
    if code not in (*DISK_FULL, errno.EFBIG) and not inside:
        return None  # an error about some other file: not ours to explain
    kept = "the existing output is unchanged" if existed else "nothing was written"
    what = "disk full while writing" if code in DISK_FULL else "cannot write"
    return FrugalError(f"{out}: {what} ({os.strerror(code)}); {kept}")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is swapped out first and put back if the move fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(root: Path) -> None:
    """Give `root` and everything in it the modes a plain `open` would (0o777/0o666 less the umask):
    temporary directories and some native writers (safetensors) create owner-only files, which other
    users, e.g. a serving container's, could not read."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories we created for an output that was not written (innermost first)."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, sources: Iterable[Any] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on failure it is removed
    (a full disk or another write error becomes one FrugalError line naming `out`). `sources`: inputs
    `out` must not be, be inside or contain."""
    out = check_output_dir(out, overwrite, sources)
    existed = out.exists()
    new_parents = [p for p in out.absolute().parents if not p.exists()]  # innermost first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        _remove_empty(new_parents)
        raise FrugalError(f"{out}: cannot create ({e.strerror or e})") from None
    try:
        yield tmp
        publish_modes(tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(new_parents)
        err = _write_error(out, tmp, e, existed)
        if err is not None:
            raise err from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write one file whole or not at all (a temporary file beside it, then a rename); a failed write
    (full disk, missing folder, permissions) is one FrugalError line and leaves `path` as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise FrugalError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        code = os_error_code(e)
        if code is not None:
            raise FrugalError(f"{path}: cannot write ({os.strerror(code)}); it was left as it was") from None
        raise
