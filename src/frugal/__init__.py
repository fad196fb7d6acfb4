"""frugal: compress causal language models and prove what it cost.

Importing the package is cheap: torch and transformers are only imported when a function that
needs them is called. The public API (frugal.api): `compress`, `analyze`, `export`, `evaluate`,
`load_model`, `Recipe`, `FrugalError`.
"""

from __future__ import annotations

import importlib

from frugal.version import __version__

__all__ = ["compress", "analyze", "export", "evaluate", "load_model", "Recipe", "FrugalError", "__version__"]

_LAZY = {"compress": "frugal.api", "analyze": "frugal.api", "export": "frugal.api", "evaluate": "frugal.api",
         "load_model": "frugal.load.model", "Recipe": "frugal.config", "FrugalError": "frugal.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'frugal' has no attribute {name!r}")
