"""Zero-shot multiple choice (frugal.evaluation.tasks): items built as lm-eval builds them, log-likelihoods equal to
a brute-force forward, acc / acc_norm as lm-eval computes them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import TOKENIZER
from frugal.evaluation import tasks
from frugal.errors import FrugalError
from frugal.evaluation.tasks import Item


@pytest.fixture(scope="module")
def data(shared):
    return shared / "data"


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    import transformers

    d = tiny_model_factory("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    return model, tok


def brute_force(model, tok, context: str, continuation: str, max_len: int | None = None) -> float:
    """Sum of log p(continuation tokens | context): one full forward, written independently of frugal.evaluation.tasks."""
    if context.endswith(" "):
        n = len(context) - len(context.rstrip())
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    cont = whole[len(ctx):]
    seq = ctx + cont
    if max_len is not None:
        seq = seq[-(max_len + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), dim=-1)
    first = len(seq) - 1 - len(cont)  # logits at position p predict token p + 1
    return sum(logp[first + k, t].item() for k, t in enumerate(cont))


# ---------------------------------------------------------------------------------------- loaders


def test_piqa_loader(data):
    docs = tasks.piqa_docs(data)
    assert len(docs) == 1838
    assert {d["label"] for d in docs} == {0, 1}
    items = tasks.load_items("piqa", data_dir=data)
    assert len(items) == 1838 and all(len(it.choices) == 2 for it in items)
    first = items[0]
    assert first.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first.continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding")
    assert first.gold == 0
    # the choices are the raw solutions, trailing and double spaces included (lm-eval keeps them)
    assert items[1].choices == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")
    assert [it.gold for it in tasks.load_items("piqa", limit=5, data_dir=data)] == [0, 1, 1, 1, 0]


def test_hellaswag_loader(data):
    docs = tasks.hellaswag_docs(data)
    assert len(docs) == 10042
    assert all(len(d["endings"]) == 4 and d["label"] in ("0", "1", "2", "3") for d in docs)
    # the split is lossless: ctx_a + " " + ctx_b gives the file's ctx back
    assert all((d["ctx_a"] + " " + d["ctx_b"] if d["ctx_b"] else d["ctx_a"]) == d["ctx"] for d in docs)
    items = tasks.load_items("hellaswag", limit=3, data_dir=data)
    assert items[0] == Item(context="Roof shingle removal: A man is sitting on a roof. He",
                            choices=("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."),
                            gold=3)
    assert items[1].context == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    assert items[2].gold == 2
    assert {it.gold for it in tasks.load_items("hellaswag", data_dir=data)} == {0, 1, 2, 3}


def test_split_context():
    assert tasks.split_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert tasks.split_context("How to x. Do y.") == ("How to x. Do y.", "")
    assert tasks.split_context('He says "hi." the man') == ('He says "hi."', "the man")
    assert tasks.split_context(". a man wearing a hat") == (".", "a man wearing a hat")
    assert tasks.split_context("a man wearing a hat") == ("", "a man wearing a hat")
    assert tasks.split_context("Really? yes it") == ("Really?", "yes it")


def test_hellaswag_preprocess_known_answers():
    pre = tasks.preprocess
    assert pre("Home: [header] How to make tea [title] Boil water. [step] Pour it.") == \
        "Home: How to make tea. Boil water. Pour it."
    assert pre("  Finally [title] done  ") == "Finally. done"
    assert pre("Visit a site like [www.x.org] to find games.") == "Visit a site like to find games."
    assert pre("a [b] [c] d") == "a  d"  # one pass of "  " -> " " only, as in lm-eval
    doc = {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.", "ctx_b": "the lady IS",
           "endings": [" [step] stands up.", "a", "b", "c"], "label": "0"}
    item = tasks.hellaswag_item(doc)
    assert item.context == "Clean and jerk: A lady walks to a barbell. The lady is"  # str.capitalize lowers the rest
    assert item.choices[0] == " stands up."  # strip comes before the bracket removal in lm-eval too
    wikihow = {"activity_label": "Health", "ctx_a": "[header] How to rest [title] Sleep.", "ctx_b": "",
               "endings": ["a", "b", "c", "d"], "label": "3"}
    assert tasks.hellaswag_item(wikihow).context == "Health: How to rest. Sleep."  # trailing space stripped
    assert tasks.hellaswag_item(wikihow).gold == 3


def test_unknown_task_and_bad_limit(tiny):
    with pytest.raises(FrugalError, match="known tasks"):
        tasks.load_items("mmlu")
    with pytest.raises(FrugalError, match="limit"):
        tasks.run_task(*tiny, "piqa", limit=0)


# -------------------------------------------------------------------------------------- tokenizing


def test_encode_pair_moves_trailing_space_and_splits_the_whole(tiny):
    _, tok = tiny
    ctx, cont = tasks.encode_pair(tok, "Question: why\nAnswer:", " Because it is.")
    whole = tok("Question: why\nAnswer: Because it is.").input_ids
    assert ctx + cont == whole and ctx == tok("Question: why\nAnswer:").input_ids
    assert tok.bos_token_id not in ctx  # tokenizer-512 adds no BOS by default, so none here
    a, b = tasks.encode_pair(tok, "Question: why\nAnswer: ", "Because")
    assert a == tok("Question: why\nAnswer:").input_ids and a + b == tok("Question: why\nAnswer: Because").input_ids


def test_bos_kept_when_the_tokenizer_adds_it(tiny, data):
    """A tokenizer that adds BOS by default: the context starts with BOS (lm-eval's default), the
    continuation has none, and the log-likelihoods still equal the brute force."""
    import transformers

    model, _ = tiny
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER, add_bos_token=True)
    ctx, cont = tasks.encode_pair(tok, "Question: why\nAnswer:", " Because it is.")
    assert ctx[0] == tok.bos_token_id and tok.bos_token_id not in cont
    items = tasks.load_items("piqa", limit=2, data_dir=data)
    lls = tasks.loglikelihoods(model, tok, items, batch_size=4, progress=False)
    for item, ll in zip(items, lls):
        for c, value in zip(item.continuations, ll):
            assert value == pytest.approx(brute_force(model, tok, item.context, c), abs=1e-4)


# ----------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("name", ["piqa", "hellaswag"])
def test_loglikelihoods_equal_brute_force(tiny, data, name):
    model, tok = tiny
    items = tasks.load_items(name, limit=4, data_dir=data)
    # batch 3: every batch but the sorted-first mixes lengths, so right padding is exercised
    lls = tasks.loglikelihoods(model, tok, items, batch_size=3, progress=False)
    for item, ll in zip(items, lls):
        assert len(ll) == len(item.choices)
        for cont, value in zip(item.continuations, ll):
            assert value == pytest.approx(brute_force(model, tok, item.context, cont), abs=1e-4)


def test_left_truncation_at_max_length(tiny_model_factory):
    import transformers

    d = tiny_model_factory("llama", max_position_embeddings=24)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tasks.max_length(model, tok) == 24
    item = Item(context="Once upon a time there was a little girl who liked to play in the park with her dog.",
                choices=("She was happy.", "It rained all day long and they went home."), gold=0)
    assert len(tok(item.context).input_ids) > 24
    lls = tasks.loglikelihoods(model, tok, [item], batch_size=2, progress=False)[0]
    for cont, value in zip(item.continuations, lls):
        assert value == pytest.approx(brute_force(model, tok, item.context, cont, max_len=24), abs=1e-4)


def test_acc_and_acc_norm_from_loglikelihoods():
    items = [Item("q", ("aa", "bbbbbbbb"), 1),  # acc: 0 (-4 > -6); norm: -2 vs -0.75 -> 1
             Item("q", ("aa", "bbbbbbbb"), 0),
             Item("q", ("a", "b", "c"), 2),    # a tie: numpy's argmax takes the first index
             Item("q", ("xyz", "x"), 0)]
    lls = [[-4.0, -6.0], [-4.0, -6.0], [-1.0, -2.0, -1.0], [-3.0, -2.0]]
    assert tasks.score(items, lls) == {"acc": 1 / 4, "acc_norm": 2 / 4, "n": 4}


def test_run_task_matches_hand_computed_argmaxes(tiny, data):
    model, tok = tiny
    res = tasks.run_task(model, tok, "hellaswag", limit=6, batch_size=5, data_dir=data, progress=False,
                         return_loglikelihoods=True)
    items = tasks.load_items("hellaswag", limit=6, data_dir=data)
    acc = acc_norm = 0
    for item in items:
        ll = [brute_force(model, tok, item.context, c) for c in item.continuations]
        norm = [v / len(c) for v, c in zip(ll, item.choices)]
        acc += max(range(4), key=lambda j: (ll[j], -j)) == item.gold
        acc_norm += max(range(4), key=lambda j: (norm[j], -j)) == item.gold
    assert res["n"] == 6
    assert res["acc"] == acc / 6 and res["acc_norm"] == acc_norm / 6


# ------------------------------------------------------------------------------------- lm-eval parity


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm_eval is not installed in this venv (bench/lm_eval_parity.py runs it in its own venv "
                           "on the real model)")
def test_parity_with_lm_eval_on_the_tiny_model(tiny_model_factory, data):
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.api.instance import Instance

    d = tiny_model_factory("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    items = tasks.load_items("piqa", limit=3, data_dir=data) + tasks.load_items("hellaswag", limit=3, data_dir=data)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(it.context, c), idx=j)
            for it in items for j, c in enumerate(it.continuations)]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = [v for ll in tasks.loglikelihoods(model, tok, items, batch_size=4, progress=False) for v in ll]
    assert ours == pytest.approx(theirs, abs=1e-4)
