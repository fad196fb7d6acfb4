"""How far a rounded weight is from the original: the two relative errors every layer report carries."""

from __future__ import annotations

import torch


def rel_errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> tuple[float, float | None]:
    """(||W - W_hat|| / ||W||, tr(dW H dW^T) / tr(W H W^T) or None without a Hessian) for (out, in) weights."""
    w = w.float()
    dw = w - w_hat.float()  # (out, in)
    out_err = None
    if h is not None:
        out_err = float(torch.einsum("oi,ij,oj->", dw, h, dw) / torch.einsum("oi,ij,oj->", w, h, w).clamp_min(1e-30))
    return float(dw.norm() / w.norm().clamp_min(1e-30)), out_err
