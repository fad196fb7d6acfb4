"""The one NaN/Inf check every loading path runs on every floating tensor it reads."""

from __future__ import annotations

import torch

from frugal.errors import FrugalError


def nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values `t` holds. A sum is the fast screen (NaN and Inf propagate through it); only
    a non-finite sum, which finite values can also overflow to, is looked at element by element."""
    if not t.is_floating_point():
        return 0
    total = torch.sum(t.detach(), dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return 0 if torch.isfinite(total) else int((~torch.isfinite(t.detach())).sum())


def check_finite(t: torch.Tensor, name: str, where: object) -> None:
    """FrugalError naming the file or directory `where` and the tensor when `t` holds NaN/Inf."""
    bad = nonfinite(t)
    if bad:
        raise FrugalError(f"{where}: weight {name} has {bad} NaN/Inf values")
