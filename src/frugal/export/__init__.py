"""Writers of on-disk formats. A format is one module with `write(compressed, directory)` plus one
entry here."""

from __future__ import annotations

import importlib

FORMATS = {"compressed-tensors": "frugal.export.compressed_tensors"}


def writer(fmt: str):
    """The `write(compressed, directory)` function of a format."""
    from ..errors import FrugalError

    if fmt not in FORMATS:
        raise FrugalError(f"--format {fmt}: known formats are {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt]).write
