"""frugal: compress causal language models and prove what it cost.

Importing the package is cheap: torch and transformers are only imported when a function that
needs them is called.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["compress", "evaluate", "load_model", "Recipe", "FrugalError", "__version__"]


def __getattr__(name: str):
    if name == "compress":
        from .api import compress

        return compress
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    if name == "load_model":
        from .load import load_model

        return load_model
    if name == "Recipe":
        from .config import Recipe

        return Recipe
    if name == "FrugalError":
        from .errors import FrugalError

        return FrugalError
    raise AttributeError(f"module 'frugal' has no attribute {name!r}")
