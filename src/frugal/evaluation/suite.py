"""`frugal eval A B C --ref R`: every model on the same tokens, items and prompts; results.json
(docs/results-schema.md), report.html and a terminal table."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from frugal.version import __version__
from frugal.errors import FrugalError
from frugal.evaluation.metrics import Protocol, evaluate, windows
from frugal.evaluation.speed import SpeedProtocol

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROMPTS = (
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
    "Quantization makes language models",
)


@dataclass
class SuiteOptions:
    protocol: Protocol
    tasks: dict[str, int | None] = field(default_factory=dict)  # task name -> item limit
    speed: bool = False
    generate: bool = False
    block_errors: bool = True
    max_new_tokens: int = 32


def weight_stats(path: Path) -> dict[str, Any]:
    """Bytes of the weight files and, for compressed-tensors checkpoints, average bits per quantized weight."""
    import math

    from safetensors import safe_open

    from frugal.evaluation.sizes import saved_bytes

    if path.is_file():
        return {"size_bytes": path.stat().st_size, "bits_per_weight": None}
    qbits, qweights = 0, 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for base in (k[: -len("weight_shape")] for k in keys if k.endswith(".weight_shape")):
                qweights += math.prod(st.get_tensor(base + "weight_shape").tolist())
                for part in ("weight_packed", "weight_scale", "weight_zero_point"):
                    if base + part in keys:
                        sl = st.get_slice(base + part)
                        qbits += math.prod(sl.get_shape()) * _bits(sl.get_dtype())
    return {"size_bytes": saved_bytes(path), "bits_per_weight": qbits / qweights if qweights else None}


def _bits(dtype: str) -> int:
    return {"I32": 32, "F32": 32, "F16": 16, "BF16": 16, "I8": 8, "U8": 8, "I64": 64, "F64": 64}.get(dtype, 32)


def layer_errors(path: Path) -> dict[str, Any] | None:
    f = path / "frugal.json" if path.is_dir() else None
    if f is None or not f.is_file():
        return None
    return json.loads(f.read_text()).get("layers")


def speed_subprocess(path: str) -> dict[str, Any] | None:
    """Speed and peak RSS measured in a fresh process, so memory belongs to that model alone."""
    proc = subprocess.run([sys.executable, "-m", "frugal.evaluation.speed", path], capture_output=True, text=True,
                          env=os.environ.copy())
    if proc.returncode != 0:
        log.warning("%s: speed measurement failed: %s", path, (proc.stderr.strip().splitlines() or ["?"])[-1])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def generations(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 32) -> list[dict[str, str]]:
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append({"prompt": p, "text": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def _vocabulary(lm) -> tuple[int, dict | None]:
    """(output logits per token, the tokenizer's token -> id map or None)."""
    head = lm.model.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else getattr(lm.model.config, "vocab_size", 0)
    return int(rows), (lm.tokenizer.get_vocab() if lm.tokenizer is not None else None)


def check_same_vocabulary(models: dict[str, Any]) -> None:
    """Refuse models that do not share one vocabulary: the same text must be the same ids for every
    model, and KL / top-1 compare logits position by position."""
    (first, lm), *rest = models.items()
    size, vocab = _vocabulary(lm)
    for spec, other in rest:
        o_size, o_vocab = _vocabulary(other)
        if o_size != size or (vocab is not None and o_vocab is not None and o_vocab != vocab):
            raise FrugalError(f"{spec}: its vocabulary ({o_size} logits, {len(o_vocab or {})} tokens) differs from "
                              f"{first}'s ({size} logits, {len(vocab or {})} tokens); models evaluated together must "
                              f"share one tokenizer")


def _groups(specs: list[str], allow_pickle: bool, headroom: float = 1.5) -> Iterator[dict[str, Any]]:
    """The models to evaluate, loaded as many at a time as fit: the next is loaded only while the
    available memory exceeds `headroom` x the largest model loaded so far, else the group so far is
    yielded first (the caller empties it when done, which frees its models)."""
    from frugal.compression.preflight import available_ram_bytes
    from frugal.evaluation.sizes import model_bytes
    from frugal.load.model import load_model

    group: dict[str, Any] = {}
    largest = 0
    for spec in specs:
        if group and available_ram_bytes() < headroom * largest:
            log.info("memory for %d model(s) at a time: evaluating them before loading %s", len(group), spec)
            yield group
            group = {}
            gc.collect()
        group[spec] = load_model(spec, allow_pickle=allow_pickle)
        largest = max(largest, model_bytes(group[spec].model))
    if group:
        yield group


def _measure(group: dict[str, Any], ref, ref_name: str, anchor: tuple[str, Any], opts: SuiteOptions,
             wins, bos, with_ref: bool) -> tuple[list[dict[str, Any]], int]:
    """results.json entries of the models in `group`, and (`with_ref`) of the reference, named `ref_name`;
    and the number of tokens scored."""
    from frugal.compression.plan import check_sequence_length

    check_same_vocabulary({anchor[0]: anchor[1], **group})
    for lm in ([ref] if ref else []) + list(group.values()):
        check_sequence_length(lm.model, opts.protocol.seq_len, "--seq-len")
    results = evaluate({k: v.model for k, v in group.items()}, anchor[1].tokenizer, opts.protocol,
                       ref=ref.model if ref else None, ref_name=ref_name)
    everyone = ({ref_name: ref} if ref else {}) | group
    entries = []
    for r in results:
        if ref is not None and r.name == ref_name and not with_ref:
            continue
        lm = everyone[r.name]
        entry = {"name": r.name, "path": str(lm.source), "is_reference": ref is not None and r.name == ref_name,
                 **weight_stats(lm.source if lm.source.is_file() else lm.path),
                 "perplexity": r.ppl, "nll": r.nll, "kl": r.kl, "top1": r.top1,
                 "layer_errors": layer_errors(lm.path)}
        if ref is not None and not entry["is_reference"] and opts.block_errors:
            from frugal.evaluation.blockerror import block_errors

            ids = wins[:1] if bos is None else torch.cat([torch.tensor([[bos]]), wins[:1]], dim=1)
            entry["block_errors"] = block_errors(lm.model, ref.model, ids)
        model = lm.model
        if opts.tasks:
            from frugal.evaluation.tasks import run_task

            entry["tasks"] = {t: run_task(model, anchor[1].tokenizer, t, limit=lim) for t, lim in opts.tasks.items()}
        if opts.generate:
            entry["generations"] = generations(model, anchor[1].tokenizer, max_new_tokens=opts.max_new_tokens)
        entries.append(entry)
    return entries, results[0].tokens


def run_suite(specs: list[str], ref_spec: str | None, opts: SuiteOptions, allow_pickle: bool = False) -> dict[str, Any]:
    """Measure everything the options ask for on every model, and return results.json's content. The
    models are held as many at a time as memory allows (`_groups`); the reference stays loaded."""
    from frugal.load.model import load_model

    ref = load_model(ref_spec, allow_pickle=allow_pickle) if ref_spec else None
    ref_name = f"{ref_spec} (ref)" if ref_spec and ref_spec in specs else (ref_spec or "")
    anchor = (ref_spec, ref) if ref else None  # whose tokenizer every model must share
    entries: list[dict[str, Any]] = []
    wins = bos = None
    for group in _groups(specs, allow_pickle):
        if anchor is None:
            anchor = next(iter(group.items()))
        if anchor[1].tokenizer is None:
            raise FrugalError(f"{anchor[0] or specs[0]}: no tokenizer, so text cannot be evaluated")
        if wins is None:
            wins, bos = windows(anchor[1].tokenizer, opts.protocol)
        new, scored = _measure(group, ref, ref_name, anchor, opts, wins, bos, with_ref=not entries)
        entries += new
        group.clear()
    if opts.speed:
        for entry in tqdm(entries, desc="speed (one process per model)", unit="model"):
            entry["speed"] = speed_subprocess(entry["path"])
    return {
        "schema_version": SCHEMA_VERSION,
        "frugal_version": __version__,
        "protocol": {
            "perplexity": {"text": Path(opts.protocol.text).name, "seq_len": opts.protocol.seq_len,
                           "max_tokens": opts.protocol.max_tokens, "bos": bos is not None,
                           "scored_tokens": scored},
            "tasks": {t: {"limit": lim} for t, lim in opts.tasks.items()},
            "speed": asdict(SpeedProtocol()) | {"threads": torch.get_num_threads()} if opts.speed else None,
        },
        "reference": ref_name or None,
        "models": entries,
    }
