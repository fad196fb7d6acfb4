"""A small MoE trained briefly on wikitext, so routing is not uniform; then RTN against GPTQ at W4, with each
expert's GPTQ statistics from its own routed tokens.

    .venv/bin/python bench/moe_trained.py              # trains once (cached in bench/.work/moe-trained)
    .venv/bin/python bench/moe_trained.py --steps 50   # smoke run (not published)

Model: Mixtral layout, 4 layers, hidden 128, 8 experts (intermediate 256), top-2, the shared tokenizer-512;
trained on wikitext-2 `valid.txt` (seed 0; AdamW, batch 16 x 256), calibrated on `valid.txt` (32 x 512),
evaluated on wikitext-2-raw test (the usual protocol). Prints a table and rewrites the `moe-trained`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import publish  # noqa: E402

WORK = ROOT / "bench" / ".work" / "moe-trained"
CONFIGS = [(4, True), (4, False), (3, True)]  # (bits, symmetric), each with RTN and GPTQ
CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              router_aux_loss_coef=0.01, output_router_logits=True, tie_word_embeddings=True)


def train(steps: int, dest: Path) -> Path:
    """Train the tiny Mixtral for `steps` steps on wikitext-2 valid.txt and save it (safetensors) to `dest`."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    from frugal.load.model import shared_dir

    tok = transformers.AutoTokenizer.from_pretrained(shared_dir() / "models" / "tokenizer-512")
    ids = torch.tensor(tok((shared_dir() / "data/wikitext-2/valid.txt").read_text())["input_ids"])  # the test text is held out
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    bar = tqdm(range(steps), desc="train", unit="step")
    for _ in bar:
        starts = torch.randint(0, len(ids) - 257, (16,), generator=gen)
        batch = torch.stack([ids[s : s + 256] for s in starts])
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    model.config.output_router_logits = False
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "train.json").write_text(json.dumps({"steps": steps, "tokens": steps * 16 * 256,
                                                "final_loss": out.loss.item()}) + "\n")
    tmp.rename(dest)
    return dest


def routed_share(report: dict) -> tuple[float, float]:
    """Smallest and largest share of routed tokens an expert got (1/8 each if uniform), over all layers."""
    per_layer: dict[str, list[int]] = {}
    for name, r in report["layers"].items():
        if r.get("tokens") is not None and name.endswith("gate_up_proj"):
            per_layer.setdefault(name.rsplit(".", 2)[0], []).append(r["tokens"])
    shares = [t / sum(ts) for ts in per_layer.values() for t in ts]
    return min(shares), max(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps (cached per value)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    import frugal
    from frugal.calibrate import from_text
    from frugal.evaluation.metrics import Protocol, evaluate
    from frugal.load.model import load_model, shared_dir

    transformers.logging.set_verbosity_error()
    src = WORK / f"steps{a.steps}"
    t0 = time.perf_counter()
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        train(a.steps, src)
    train_s = time.perf_counter() - t0
    loaded = load_model(src)
    calib = from_text(loaded.tokenizer, shared_dir() / "data/wikitext-2/valid.txt", 32, 512, seed=0)
    protocol = Protocol(text=str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), seq_len=512,
                        max_tokens=512 * a.windows)
    models, meta = {}, {}
    for bits, sym, method in [(b, s, m) for b, s in CONFIGS for m in ("rtn", "gptq")]:
        name = f"{method} W{bits} g64 {'sym' if sym else 'asym'}"
        recipe = {"method": method, "weights": {"bits": bits, "group_size": 64, "symmetric": sym},
                  "calibration": {"num_samples": 32, "seq_len": 512}, "seed": 0}
        t1 = time.perf_counter()
        res = frugal.compress(loaded.model, recipe, calib, tokenizer=loaded.tokenizer)
        report = res.report.to_dict()
        stats = [r.get("statistics") for r in report["layers"].values() if r.get("statistics")]
        meta[name] = {"seconds": time.perf_counter() - t1, "share": routed_share(report) if stats else None,
                      "statistics": {s: stats.count(s) for s in sorted(set(stats))}}
        models[name] = res.model
    results = evaluate(models, loaded.tokenizer, protocol, ref=loaded.model, ref_name="float")
    ref = results[0]
    gap = {r.name: r.ppl / ref.ppl - 1 for r in results}
    rows = []
    for r in results:
        m = meta.get(r.name, {})
        share = m.get("share")
        rows.append([r.name, f"{r.ppl:.3f}", "" if r.name == "float" else f"{100 * gap[r.name]:+.2f}%",
                     "" if r.kl is None else f"{r.kl:.4f}",
                     f"{m['seconds']:.0f}" if m else "",
                     ", ".join(f"{k} {v}" for k, v in m.get("statistics", {}).items()),
                     f"{100 * share[0]:.1f}-{100 * share[1]:.1f}%" if share else ""])
    headers = ["model", "ppl", "ppl vs float", "KL (nats/tok)", "compress s", "expert statistics (layers)",
               "routed share per expert"]
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in rows]
    info = json.loads((src / "train.json").read_text())
    kl = {r.name: r.kl for r in results}
    ratios = "; ".join(
        f"W{b} {'sym' if s else 'asym'}: ppl gap {gap[f'gptq W{b} g64 ' + ('sym' if s else 'asym')] / gap[f'rtn W{b} g64 ' + ('sym' if s else 'asym')]:.2f}, "
        f"KL {kl[f'gptq W{b} g64 ' + ('sym' if s else 'asym')] / kl[f'rtn W{b} g64 ' + ('sym' if s else 'asym')]:.2f}"
        for b, s in CONFIGS)
    body = (f"Tiny Mixtral (4 layers, hidden 128, 8 experts of 256, top-2, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M "
            f"parameters) trained {info['steps']} steps ({info['tokens'] / 1e6:.1f}M tokens of wikitext-2 valid.txt, final "
            f"loss {info['final_loss']:.2f}{f', {train_s / 60:.0f} min' if train_s > 60 else ''}); calibration 32 x 512 "
            f"tokens of valid.txt; evaluation {ref.tokens} tokens of wikitext-2-raw test. Each expert's GPTQ Hessian comes "
            f"from the tokens routed to it (`own`), or is pooled over the layer's experts when it saw fewer tokens than its "
            f"input width (`pooled`, see docs/design.md). GPTQ / RTN ratios (ppl gap; KL): {ratios}. Dense "
            f"reference (default model, section gptq-vs-rtn, W4 g64 sym): ppl gap 30.1 % / 41.3 % = 0.73, KL "
            f"0.2671 / 0.4356 = 0.61. Compress seconds are wall time on a shared CPU.\n\n" + "\n".join(md) + "\n")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "moe_trained.json").write_text(json.dumps(
        {"train": info, "results": [r.to_dict() | meta.get(r.name, {}) for r in results]}, indent=2) + "\n")
    publish("moe-trained", "MoE: a trained tiny Mixtral, GPTQ with per-expert statistics vs RTN", "bench/moe_trained.py",
            [] if a.steps == 1500 else [f"--steps {a.steps}"], body, docs=a.steps >= 500 and math.isfinite(ref.ppl))


if __name__ == "__main__":
    main()
