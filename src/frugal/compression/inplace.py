"""Writing new values into a model's parameters without growing the process.

transformers maps a safetensors checkpoint privately (copy-on-write) and its tensors are views of that
one map. Rebinding a parameter's `.data` to a new tensor leaves the old pages resident for as long as any
tensor of the file lives, so a compression that rebinds every weight held the model twice at its peak.
Writing into the existing storage makes each page private once instead: the peak stays near one model.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value: into param's own storage when shape and dtype match (no second copy of the weight
    stays alive), else by rebinding param.data."""
    if param.shape == value.shape and param.dtype == value.dtype and param.device == value.device:
        if param.data_ptr() != value.data_ptr():
            param.data.copy_(value)
    else:
        param.data = value
