"""Outputs appear whole or not at all: write into a hidden temporary directory, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import FrugalError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done, unless `overwrite`."""
    out = Path(out)
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


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on failure it is removed."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
