"""Every family frugal writes to GGUF, checked by llama.cpp itself: a tiny random model of each (bench/zoo.py
sizes) exported as F32 GGUF, its perplexity in llama.cpp against transformers' on the same windows, and a
W4 (Q4_0) export's against frugal's own evaluation of it.

    .venv/bin/python bench/gguf_families.py            # every family with a GGUF record
    .venv/bin/python bench/gguf_families.py olmo2      # some (not published)

Builds bench/.venvs/llama-cpp once (bench/gguf_vs_llamacpp.py). Prints a table and rewrites the
`gguf-families` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import publish  # noqa: E402

WORK = ROOT / "bench" / ".work" / "gguf-families"
# Config settings llama.cpp's graph for the architecture assumes (see docs/formats.md).
OVERRIDES = {"qwen3_moe": {"norm_topk_prob": True}, "olmoe": {"num_key_value_heads": 4}, "gemma2": {"query_pre_attn_scalar": 16},
             "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},  # grouped qkv: the rows reordered
             "gemma3_text": {"query_pre_attn_scalar": 16}}


def one(family: str, G, protocol, tok, wins_path: Path, bos_args: list[str], threads: int) -> list[str]:
    import torch
    import transformers
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    import frugal
    from frugal.evaluation.metrics import evaluate
    from frugal.exporters.gguf import write_gguf
    from zoo import tiny_config

    torch.manual_seed(0)
    try:
        cfg = tiny_config(family, **OVERRIDES.get(family, {}))
    except Exception:  # a config whose head_dim is derived (Falcon): as bench/zoo.build, without it
        cfg = tiny_config(family, ("head_dim",), **OVERRIDES.get(family, {}))
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    f32 = WORK / f"{family}-f32.gguf"
    write_gguf(f32, model, tok, {}, "", float_type="F32")
    recipe = {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "seed": 0,
              "storage": {"dtype": "float32", "scale_dtype": "float16"}}
    src = WORK / "tiny"  # a neutral general.name: llama.cpp applies phi-3 token attributes to names with "phi3"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    c = frugal.compress(src, recipe, formats=("gguf",))
    c.save(WORK / f"{family}-q4", overwrite=True, fmt="gguf")
    ours = {r.name: r.ppl for r in evaluate({"q4": c.model}, tok, protocol, ref=model, ref_name="float")}
    lc = {k: G.runner("ppl", str(p), str(wins_path), *bos_args, threads=threads)["ppl"]
          for k, p in (("float", f32), ("q4", WORK / f"{family}-q4" / "model.gguf"))}
    arch = GGUFReader(f32).fields["general.architecture"].contents()
    hf = "not supported"  # transformers' own GGUF loader, where it has the architecture
    if arch in GGUF_CONFIG_MAPPING:
        try:
            loaded = transformers.AutoModelForCausalLM.from_pretrained(WORK, gguf_file=f32.name, dtype=torch.float32)
            ppl = next(r.ppl for r in evaluate({"gguf": loaded.eval()}, tok, protocol, ref=model, ref_name="float")
                       if r.name == "gguf")
            hf = f"{100 * (ppl / ours['float'] - 1):+.3f}%"
        except Exception as e:  # the loader's own limits (llama.cpp read the same file above)
            hf = f"loader fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return [family, f"`{arch}`", f"{ours['float']:.4f}", f"{lc['float']:.4f}", f"{100 * (lc['float'] / ours['float'] - 1):+.3f}%", hf,
            f"{ours['q4']:.4f}", f"{lc['q4']:.4f}", f"{100 * (lc['q4'] / ours['q4'] - 1):+.3f}%"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="model types (default: every family with a GGUF record)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np
    import transformers

    import gguf_vs_llamacpp as G
    from frugal.evaluation.metrics import Protocol, windows
    from frugal.families import supporting
    from frugal.load.model import shared_dir

    transformers.logging.set_verbosity_error()
    G.ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(shared_dir() / "models" / "tokenizer-512")
    protocol = Protocol(str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), 512, 512 * a.windows)
    wins, bos = windows(tok, protocol)
    np.save(WORK / "windows.npy", wins.numpy())
    bos_args = [] if bos is None else ["--bos", str(bos)]
    families = a.families or supporting("gguf")
    rows = []
    for fam in families:
        try:
            rows.append(one(fam, G, protocol, tok, WORK / "windows.npy", bos_args, a.threads))
        except Exception as e:  # one family's failure is a row, not the end of the run
            rows.append([fam, "", "", "", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", "", "", "", ""])
        print(" | ".join(rows[-1]), flush=True)
    headers = ["family", "GGUF arch", "transformers ppl (F32)", "llama.cpp ppl (F32 GGUF)", "difference",
               "transformers' GGUF loader (F32 GGUF)",
               "frugal ppl (RTN W4 g32)", "llama.cpp ppl (its Q4_0 GGUF)", "difference"]
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in rows]
    body = (f"Tiny random models (bench/zoo.py sizes, tokenizer-512, seed 0), {wins.numel()} tokens of wikitext-2-raw test "
            f"in windows of 512, the same windows in both engines (llama-cpp-python {G.LLAMA_CPP.split('==')[1]}, "
            f"{a.threads} threads). Random weights: perplexity near the vocabulary size (512); the check is that llama.cpp "
            f"computes what transformers (F32) and frugal (Q4_0) compute from frugal's file, and that transformers' own "
            f"GGUF loader, where it has the architecture, reads the F32 file back to the same model.\n\n" + "\n".join(md) + "\n")
    publish("gguf-families", "GGUF in llama.cpp, family by family", "bench/gguf_families.py", [], body,
            docs=not a.families)


if __name__ == "__main__":
    main()
