"""KL(P_ref || P_model) and top-1 agreement of two runs over the same positions: the single
implementation that evaluation and analysis share."""

from __future__ import annotations

import torch


def kl_sum(lp_ref: torch.Tensor, lp: torch.Tensor, sum_dtype: torch.dtype | None = None) -> float:
    """Sum over positions of KL(p_ref || p) for (L, V) log-probs; divide by L for the per-token mean.

    The sum runs in the log-probs' dtype, or in `sum_dtype` when given (frugal.analysis.ops sums its
    float64 log-probs with an explicit float64 accumulator)."""
    terms = lp_ref.exp() * (lp_ref - lp)
    return (terms.sum() if sum_dtype is None else terms.sum(dtype=sum_dtype)).item()


def top1_agree(lp_ref: torch.Tensor, lp: torch.Tensor) -> int:
    """Positions of (L, V) log-probs (or logits) whose argmax is the reference's."""
    return int((lp_ref.argmax(-1) == lp.argmax(-1)).sum())


def kl_top1(lp_ref: torch.Tensor, lp: torch.Tensor, sum_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(kl_sum, top1_agree) of (L, V) log-probs."""
    return kl_sum(lp_ref, lp, sum_dtype), top1_agree(lp_ref, lp)
