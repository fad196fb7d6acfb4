"""What the scales' storage dtype costs: RTN W4 g64 on the signed-extreme symmetric grid (the data-free
peer row of docs/benchmarks.md), scales quantized against bfloat16, float16 or float32, evaluated on the
peer protocol (first 20480 tokens of wikitext-2-raw test, 40 windows of 512) beside the float model.
Only the decoder linears change (as the peer runners' dequantized checkpoints), so the rows differ by
their scales alone."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

VARIANTS = ("bfloat16", "float16", "float32")


def quantized_copy(scale_dtype: str, bits: int, group: int, symmetric: bool):
    """The float default model with its decoder linears replaced by RTN's dequantized weights."""
    import frugal
    from frugal.load.model import load_model

    recipe = frugal.Recipe.from_dict({"method": "rtn", "weights": {"bits": bits, "group_size": group, "symmetric": symmetric},
                                      "storage": {"dtype": "float32", "scale_dtype": scale_dtype}, "ignore": ["lm_head"]})
    res = frugal.compress(load_model(None).model, recipe, None, inplace=True)
    model = load_model(None).model
    mods = dict(model.named_modules())
    for name, q in res.quantized.items():
        mods[name].weight.data = q.dequantize(torch.float32)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from frugal.api import eval_protocol
    from frugal.evaluation.metrics import evaluate
    from frugal.load.model import load_model

    base = load_model(None)
    models = {v: quantized_copy(v, a.bits, a.group, not a.asym) for v in VARIANTS}
    results = evaluate(models, base.tokenizer, eval_protocol(None, 512, 512 * a.windows), ref=base.model,
                       ref_name="float")
    ref = results[0]
    rows = ["| scales stored in | ppl | ppl vs float | KL (nats/tok) | top-1 |", "|---|---|---|---|---|",
            f"| (float model) | {ref.ppl:.3f} | | | |"]
    rows += [f"| {r.name} | {r.ppl:.3f} | {100 * (r.ppl / ref.ppl - 1):+.2f}% | {r.kl:.4f} | {100 * r.top1:.1f}% |"
             for r in results[1:]]
    body = (f"RTN W{a.bits} g{a.group} {'asymmetric' if a.asym else 'symmetric (signed extreme)'}, decoder linears "
            f"only, {a.windows} windows of 512 tokens of wikitext-2-raw test; the scale of each group is rounded "
            f"to the dtype before the codes are chosen against it.\n\n" + "\n".join(rows) + "\n")
    publish("scale-storage", "Scale storage: bfloat16, float16, float32", "bench/scale_storage.py", sys.argv[1:],
            body, not a.no_docs)


if __name__ == "__main__":
    main()
