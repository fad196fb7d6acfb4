"""Speed and memory of a model in frugal's torch path: prefill and decode tokens/s, time to first
token, peak resident memory. Run `python -m frugal.evaluation.speed MODEL` for a clean process per model, so
peak RSS belongs to that model alone (VmHWM, frugal.compression.preflight.peak_rss_bytes: ru_maxrss would
report at least the parent's peak, which holds every model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from frugal.compression.preflight import peak_rss_bytes  # VmHWM: this process's own peak, not its parent's


@dataclass(frozen=True)
class SpeedProtocol:
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


@torch.no_grad()
def _one_run(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds incl. first token, decode seconds for the remaining tokens), greedy with cache."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return t1 - t0, time.perf_counter() - t1


def measure(model, protocol: SpeedProtocol = SpeedProtocol(), seed: int = 0) -> dict:
    """Median and spread over `repeats` runs after `warmup` runs, on a fixed random prompt."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (1, protocol.prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    for _ in range(protocol.warmup):
        _one_run(model, prompt, protocol.new_tokens)
    prefill, decode = [], []
    for _ in range(protocol.repeats):
        p, d = _one_run(model, prompt, protocol.new_tokens)
        prefill.append(p)
        decode.append(d)
    return {
        "prefill_tok_s": _spread([protocol.prompt_tokens / p for p in prefill]),
        "decode_tok_s": _spread([(protocol.new_tokens - 1) / d for d in decode]),
        "ttft_s": _spread(prefill),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m frugal.evaluation.speed", description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    import transformers

    from frugal.errors import FrugalError
    from frugal.load.model import load_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = load_model(a.model).model
    except FrugalError as e:
        print(f"frugal: error: {e}", file=sys.stderr)
        return 2
    result = measure(model, SpeedProtocol(a.prompt_tokens, a.new_tokens, a.repeats))
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
