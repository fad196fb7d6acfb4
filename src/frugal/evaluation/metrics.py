"""Minimal evaluation on one fixed protocol: perplexity, KL divergence from a reference, top-1 agreement.

Protocol (the same for every model): the evaluation text is tokenized whole without special tokens;
its first `max_tokens` tokens are cut into non-overlapping windows of `seq_len` tokens (a last partial
window is dropped). If the tokenizer adds BOS by default, every window is fed as BOS + window and all
`seq_len` tokens are scored; otherwise the window is fed as is and its first token is not scored.
KL(P_ref || P_model) and top-1 agreement are averaged over the same scored positions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from frugal.calibrate import tokenize_text, uses_bos
from frugal.errors import FrugalError
from frugal.evaluation.divergence import kl_top1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    text: str
    seq_len: int = 512
    max_tokens: int = 8192


@dataclass
class EvalResult:
    name: str
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    kl: float | None = None  # mean KL(P_ref || P_model) per token (nats)
    top1: float | None = None  # fraction of positions where argmax agrees with the reference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(tokenizer, protocol: Protocol) -> tuple[torch.Tensor, int | None]:
    """(n_windows, seq_len) text token ids and the BOS id to prepend (or None)."""
    ids = tokenize_text(tokenizer, protocol.text)[: protocol.max_tokens]
    n = ids.numel() // protocol.seq_len
    if n == 0:
        raise FrugalError(f"{protocol.text}: {ids.numel()} tokens, fewer than one window of {protocol.seq_len}")
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    return ids[: n * protocol.seq_len].reshape(n, protocol.seq_len), bos


def _logprobs(model, window: torch.Tensor, bos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at scored positions (T, V) and their targets (T,)."""
    device = next(model.parameters()).device
    inp = window if bos is None else torch.cat([torch.tensor([bos]), window])
    logits = model(inp[None].to(device), use_cache=False).logits[0, :-1].float().cpu()
    targets = window if bos is not None else window[1:]
    return F.log_softmax(logits, dim=-1), targets


@torch.no_grad()
def evaluate(models: dict[str, Any], tokenizer, protocol: Protocol, ref: Any | None = None,
             ref_name: str = "reference") -> list[EvalResult]:
    """Evaluate models (and the reference) window by window on the same tokens."""
    wins, bos = windows(tokenizer, protocol)
    everyone = ({ref_name: ref} if ref is not None else {}) | dict(models)
    nll = {k: 0.0 for k in everyone}
    kl = {k: 0.0 for k in models}
    agree = {k: 0 for k in models}
    count = 0
    for w in tqdm(wins, desc="evaluate", unit="window"):
        ref_lp = None
        if ref is not None:
            ref_lp, targets = _logprobs(ref, w, bos)
            nll[ref_name] -= ref_lp.gather(1, targets[:, None]).sum().item()
        for name, model in models.items():
            lp, targets = _logprobs(model, w, bos)
            nll[name] -= lp.gather(1, targets[:, None]).sum().item()
            if ref_lp is not None:
                k, a = kl_top1(ref_lp, lp)
                kl[name] += k
                agree[name] += a
        count += targets.numel()
    results = []
    for name in everyone:
        mean = nll[name] / count
        r = EvalResult(name=name, ppl=math.exp(mean), nll=mean, tokens=count)
        if ref is not None and name in models:
            r.kl, r.top1 = kl[name] / count, agree[name] / count
        results.append(r)
    return results
