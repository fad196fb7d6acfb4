"""Where the error comes from: each block of a candidate fed the reference's inputs to that block.

rel_error_i = ||B_i^cand(x_i) - B_i^ref(x_i)|| / ||B_i^ref(x_i)||, with x_i the reference's input to
block i, so errors do not accumulate and each block's own damage is visible.
"""

from __future__ import annotations

import torch

from frugal.load.blocks import find_blocks
from frugal.compression.hooks import recording_calls, run_block


@torch.no_grad()
def block_errors(model, ref, ids: torch.Tensor) -> list[dict]:
    """Per-block relative output error of `model` against `ref` on (1, seq) token ids."""
    ref_name, ref_blocks = find_blocks(ref)
    _, blocks = find_blocks(model)
    if len(blocks) != len(ref_blocks):
        raise ValueError(f"{len(blocks)} blocks vs {len(ref_blocks)} in the reference")
    outs: list[torch.Tensor] = [None] * len(ref_blocks)

    def post(i):
        def hook(_m, _args, _kwargs, out):
            outs[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    handles = [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(ref_blocks)]
    try:
        with recording_calls(ref_blocks) as calls:
            ref(ids.to(next(ref.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    device = next(model.parameters()).device
    result = []
    for i, block in enumerate(blocks):
        hidden, args, kwargs = calls[i]
        mine = run_block(block, hidden.to(device), args, kwargs).to(outs[i].device)
        rel = (mine.float() - outs[i].float()).norm() / outs[i].float().norm().clamp_min(1e-30)
        result.append({"block": f"{ref_name}.{i}", "rel_error": float(rel)})
    return result
