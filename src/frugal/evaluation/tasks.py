"""Zero-shot multiple choice (PIQA, HellaSwag), scored exactly as lm-eval 0.4.x scores them.

Items are built as lm-eval's `piqa` and `hellaswag` tasks build them:

* PIQA: context ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]``, gold ``label``.
* HellaSwag: context ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``,
  choices ``[preprocess(e) for e in endings]``, gold ``int(label)`` (``preprocess`` below applies
  the same normalisation as lm-eval's hellaswag task).

Every choice is scored as the continuation ``" " + choice`` (lm-eval's default target delimiter),
the way lm-eval's HFLM ``loglikelihood`` does it: whitespace at the end of the context moves to the
continuation; ``whole = encode(context + continuation)``, ``context_enc = encode(context)``,
``continuation_enc = whole[len(context_enc):]``, with the tokenizer's default special tokens (a BOS
only if the tokenizer adds one to plain text by default); the model reads
``(context_enc + continuation_enc)[-(max_length + 1):][:-1]`` and the log-probabilities of the
continuation tokens are summed. ``acc`` is the argmax of the sums, ``acc_norm`` the argmax of
sum / ``len(choice)`` in characters (without the delimiter), first index on ties, as numpy does.

The shared HellaSwag file (6 lines per item: ``activity_label: ctx``, gold, four endings) holds
``ctx`` already joined (``ctx_a + " " + ctx_b``, ``ctx_b`` not capitalized) and with the WikiHow
brackets already stripped. ``hellaswag_docs`` splits it back: a context that ends a sentence
(``.``, ``!``, ``?``: every WikiHow item) has an empty ``ctx_b``; otherwise (every ActivityNet item)
``ctx_b`` is the fragment after the last sentence end. Exact for all 10,042 items as far as the file
shows (no fragment holds an upper-case letter, so ``capitalize`` only changes its first letter).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from frugal.errors import FrugalError

log = logging.getLogger(__name__)

TASKS = ("piqa", "hellaswag")
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter for multiple choice
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer give a length
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no model_max_length"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the context, the choice strings (without delimiter), the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int

    @property
    def continuations(self) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices]


# --------------------------------------------------------------------------------------------- data


def _data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    from frugal.load.model import shared_dir

    return shared_dir() / "data"


def piqa_docs(data_dir: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """PIQA validation docs as in lm-eval's dataset: goal, sol1, sol2, label (int), in file order."""
    d = _data_dir(data_dir) / "piqa"
    jl, lab = d / "valid.jsonl", d / "valid-labels.lst"
    for p in (jl, lab):
        if not p.is_file():
            raise FrugalError(f"{p}: PIQA file not found")
    rows = [line for line in jl.read_text(encoding="utf-8").split("\n") if line.strip()]
    labels = [line.strip() for line in lab.read_text(encoding="utf-8").split("\n") if line.strip()]
    if len(rows) != len(labels):
        raise FrugalError(f"{d}: {len(rows)} PIQA items but {len(labels)} labels")
    docs = []
    for i, (row, label) in enumerate(zip(rows, labels)):
        if limit is not None and i >= limit:
            break
        r = json.loads(row)
        if label not in ("0", "1"):
            raise FrugalError(f"{lab}:{i + 1}: PIQA label {label!r} is not 0 or 1")
        docs.append({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)})
    return docs


_SENTENCE_END = re.compile(r"[.!?]\"? ")


def split_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) from HellaSwag's joined ``ctx_a + " " + ctx_b`` (see the module docstring)."""
    if not ctx or ctx[-1] in ".!?":
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    m = ends[-1]
    return ctx[: m.end() - 1], ctx[m.end():]


def hellaswag_docs(data_dir: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """HellaSwag validation docs as in the HF dataset: activity_label, ctx_a, ctx_b, ctx, endings, label (str)."""
    path = _data_dir(data_dir) / "hellaswag" / "hellaswag_val_full.txt"
    if not path.is_file():
        raise FrugalError(f"{path}: HellaSwag file not found")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise FrugalError(f"{path}: {len(lines)} lines, not 6 per item")
    docs = []
    for i in range(0, len(lines), 6):
        if limit is not None and len(docs) >= limit:
            break
        head, label, *endings = lines[i : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise FrugalError(f"{path}:{i + 1}: not a HellaSwag item (`activity_label: ctx`, gold 0-3, 4 endings)")
        ctx_a, ctx_b = split_context(ctx)
        docs.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": endings, "label": label})
    return docs


_BRACKETED = re.compile(r"\[.*?\]")


def preprocess(text: str) -> str:
    """HellaSwag's text normalisation as lm-eval applies it: WikiHow's " [title]" markers become
    sentence breaks, other bracketed tags (dataset artefacts) are dropped, doubled spaces collapse."""
    cleaned = _BRACKETED.sub("", text.strip().replace(" [title]", ". "))
    return cleaned.replace("  ", " ")


def piqa_item(doc: dict[str, Any]) -> Item:
    return Item(context=f"Question: {doc['goal']}\nAnswer:", choices=(doc["sol1"], doc["sol2"]), gold=int(doc["label"]))


def hellaswag_item(doc: dict[str, Any]) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(context=preprocess(doc["activity_label"] + ": " + ctx),
                choices=tuple(preprocess(e) for e in doc["endings"]), gold=int(doc["label"]))


def load_items(name: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[Item]:
    """The first `limit` items of a task, in file order (as lm-eval's --limit)."""
    if name == "piqa":
        return [piqa_item(d) for d in piqa_docs(data_dir, limit)]
    if name == "hellaswag":
        return [hellaswag_item(d) for d in hellaswag_docs(data_dir, limit)]
    raise FrugalError(f"task {name!r}: known tasks are {', '.join(TASKS)}")


# --------------------------------------------------------------------------------------- tokenizing


def _prefix_token_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def _encoder(tokenizer):
    """lm-eval HFLM.tok_encode with add_bos_token unset: the tokenizer's default special tokens,
    except none when the string already starts with the BOS (prefix token) text."""
    prefix = _prefix_token_id(tokenizer)
    bos_str = tokenizer.decode(prefix) if prefix is not None else None

    def encode(text: str) -> list[int]:
        if bos_str is not None and text.startswith(bos_str):
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(text)

    return encode


def encode_pair(tokenizer, context: str, continuation: str, encode=None) -> tuple[list[int], list[int]]:
    """(context_enc, continuation_enc) as lm-eval's loglikelihood builds them for a causal model."""
    encode = encode or _encoder(tokenizer)
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc):]


def max_length(model, tokenizer) -> int:
    """lm-eval's resolve_max_length: config (text_config first), then tokenizer, then 2048."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY:
        return int(mml)
    return DEFAULT_MAX_LENGTH


# ------------------------------------------------------------------------------------------ scoring


def loglikelihoods(model, tokenizer, items: Iterable[Item], batch_size: int = 16,
                   progress: bool = True, desc: str = "tasks") -> list[list[float]]:
    """Sum of log-probabilities of every choice's continuation tokens, per item, per choice.

    Requests are sorted longest first and run `batch_size` sequences at a time, right-padded with
    an attention mask (right padding leaves every real position's logits unchanged).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if tokenizer is None:
        raise FrugalError("the model has no tokenizer, so task items cannot be tokenized")
    items = list(items)
    encode = _encoder(tokenizer)
    limit = max_length(model, tokenizer)
    reqs = []  # (item index, choice index, input ids, number of continuation tokens)
    for i, item in enumerate(items):
        for j, cont in enumerate(item.continuations):
            ctx_enc, cont_enc = encode_pair(tokenizer, item.context, cont, encode)
            if not ctx_enc or not cont_enc:
                raise FrugalError(f"task item {i}, choice {j}: empty context or continuation after tokenizing")
            if len(cont_enc) > limit:
                raise FrugalError(f"task item {i}, choice {j}: continuation longer than the model's {limit} tokens")
            if len(ctx_enc) + len(cont_enc) > limit + 1:
                log.warning("task item %d: %d tokens, truncated from the left to %d", i,
                            len(ctx_enc) + len(cont_enc), limit + 1)
            reqs.append((i, j, (ctx_enc + cont_enc)[-(limit + 1):][:-1], cont_enc))
    order = sorted(range(len(reqs)), key=lambda k: (-len(reqs[k][2]), reqs[k][0], reqs[k][1]))
    out: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    batch_size = max(1, int(batch_size))
    bar = tqdm(total=len(reqs), desc=desc, unit="choice", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [reqs[k] for k in order[start : start + batch_size]]
            width = max(len(r[2]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, (_, _, inp, _) in enumerate(chunk):
                ids[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                mask[b, : len(inp)] = 1
            kwargs = {"attention_mask": mask.to(device)} if bool((mask == 0).any()) else {}
            logits = model(ids.to(device), use_cache=False, **kwargs).logits
            for b, (i, j, inp, cont) in enumerate(chunk):
                n = len(inp)  # the logits at n - len(cont) .. n - 1 predict the continuation tokens
                lp = F.log_softmax(logits[b, n - len(cont) : n].float(), dim=-1).cpu()
                tgt = torch.tensor(cont, dtype=torch.long)
                out[i][j] = float(lp.gather(1, tgt[:, None]).sum())
            bar.update(len(chunk))
    bar.close()
    return out


def predictions(items: list[Item], lls: list[list[float]]) -> list[tuple[int, int]]:
    """(argmax of log-likelihood, argmax of log-likelihood / choice length in characters) per item,
    with numpy's argmax (the first index on ties) as lm-eval."""
    import numpy as np

    out = []
    for item, ll in zip(items, lls, strict=True):
        ll = np.array(ll, dtype=np.float64)
        lengths = np.array([float(len(c)) for c in item.choices])
        out.append((int(np.argmax(ll)), int(np.argmax(ll / lengths))))
    return out


def score(items: list[Item], lls: list[list[float]]) -> dict[str, Any]:
    """acc and acc_norm from per-choice log-likelihoods."""
    preds = predictions(items, lls)
    acc = sum(float(p == item.gold) for (p, _), item in zip(preds, items))
    acc_norm = sum(float(p == item.gold) for (_, p), item in zip(preds, items))
    n = len(items)
    return {"acc": acc / n if n else None, "acc_norm": acc_norm / n if n else None, "n": n}


def run_task(model, tokenizer, name: str, limit: int | None = None, batch_size: int = 16,
             data_dir: str | Path | None = None, progress: bool = True,
             return_loglikelihoods: bool = False) -> dict[str, Any]:
    """Zero-shot `name` (piqa or hellaswag) on the first `limit` items: {"acc", "acc_norm", "n"}."""
    if limit is not None and limit <= 0:
        raise FrugalError(f"task limit {limit}: must be positive")
    items = load_items(name, limit, data_dir)
    lls = loglikelihoods(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=name)
    res = score(items, lls)
    if return_loglikelihoods:
        res["loglikelihoods"] = lls
    return res
