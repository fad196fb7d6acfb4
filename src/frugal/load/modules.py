"""Module-tree surgery shared by the loaders' conversions (MoE experts, Conv1D)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


def replace_modules(model: nn.Module, match: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of `model` that `match`es by `make(it)` (in place); how many."""
    found = [(name, mod) for name, mod in model.named_modules() if match(mod)]
    for name, mod in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(mod))
    return len(found)
