"""The trained tiny Mixtral (bench/moe_trained.py) in llama.cpp: its float GGUF (F32) against transformers, and
frugal's GPTQ W4 output exported to GGUF (the experts stacked into ffn_*_exps, Q4_0) against frugal's own
evaluation of it, on the same windows; and a tiny random model of each MoE architecture frugal writes
(mixtral, qwen2_moe, qwen3_moe, olmoe) as F32 GGUF in llama.cpp against transformers.

    .venv/bin/python bench/moe_gguf.py     # needs bench/moe_trained.py's model; builds bench/.venvs/llama-cpp once

Prints a table and rewrites the `moe-gguf` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import publish  # noqa: E402

WORK = ROOT / "bench" / ".work" / "moe-gguf"


# Tiny random models of each MoE architecture frugal writes (bench/zoo.py sizes; qwen3_moe with the
# renormalised routing llama.cpp's qwen3moe graph computes; olmoe without grouped-query attention, as OLMoE).
PARITY = {"mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {"norm_topk_prob": True}, "olmoe": {"num_key_value_heads": 4}}


def parity(G, protocol, threads: int) -> list[list[str]]:
    """Per MoE architecture: a tiny random model's F32 GGUF in llama.cpp against transformers, same windows."""
    import numpy as np
    import torch
    import transformers
    from gguf import GGUFReader

    from frugal.evaluation.metrics import evaluate, windows
    from frugal.exporters.gguf import write_gguf
    from frugal.load.model import shared_dir
    from zoo import tiny_config

    tok = transformers.AutoTokenizer.from_pretrained(shared_dir() / "models" / "tokenizer-512")
    wins, bos = windows(tok, protocol)
    np.save(WORK / "parity-windows.npy", wins.numpy())
    rows = []
    for family, over in PARITY.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **over)).eval()
        path = WORK / f"parity-{family}.gguf"
        write_gguf(path, model, tok, {}, "", float_type="F32")
        ours = evaluate({}, tok, protocol, ref=model, ref_name=family)[0].ppl
        lc = G.runner("ppl", str(path), str(WORK / "parity-windows.npy"),
                      *([] if bos is None else ["--bos", str(bos)]), threads=threads)["ppl"]
        arch = GGUFReader(path).fields["general.architecture"].contents()
        rows.append([f"{family} (tiny random, arch `{arch}`)", f"{ours:.4f}", f"{lc:.4f}", f"{100 * (lc / ours - 1):+.3f}%",
                     f"{path.stat().st_size / 1e6:.1f} MB (F32)"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="which trained model (bench/moe_trained.py --steps)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np
    import transformers

    import frugal
    import gguf_vs_llamacpp as G
    from frugal.calibrate import from_text
    from frugal.evaluation.metrics import Protocol, evaluate, windows
    from frugal.exporters.gguf import write_gguf
    from frugal.load.model import load_model, shared_dir
    from moe_trained import WORK as TRAINED

    transformers.logging.set_verbosity_error()
    src = TRAINED / f"steps{a.steps}"
    if not src.is_dir():
        raise SystemExit(f"moe_gguf: {src} missing; run bench/moe_trained.py first")
    G.ensure_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    loaded = load_model(src)
    protocol = Protocol(str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), 512, 512 * a.windows)
    wins, bos = windows(loaded.tokenizer, protocol)
    np.save(WORK / "windows.npy", wins.numpy())
    bos_args = [] if bos is None else ["--bos", str(bos)]
    float_gguf = WORK / "float-f32.gguf"
    write_gguf(float_gguf, loaded.model, loaded.tokenizer, {}, str(src), float_type="F32")
    calib = from_text(loaded.tokenizer, shared_dir() / "data/wikitext-2/valid.txt", 32, 512, seed=0)
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 64}, "calibration": {"num_samples": 32, "seq_len": 512},
              "storage": {"dtype": "float32", "scale_dtype": "float16"}, "seed": 0}
    c = frugal.compress(loaded.model, recipe, calib, tokenizer=loaded.tokenizer)
    c.save(WORK / "gptq", overwrite=True, fmt="gguf")
    ours = {r.name: r for r in evaluate({"gptq": c.model}, loaded.tokenizer, protocol, ref=loaded.model, ref_name="float")}
    lc = {k: G.runner("ppl", str(p), str(WORK / "windows.npy"), *bos_args, threads=a.threads)
          for k, p in (("float", float_gguf), ("gptq", WORK / "gptq" / "model.gguf"))}
    types = sorted({t for t in G.tensor_types(WORK / "gptq" / "model.gguf").values()})
    rows = [["float", f"{ours['float'].ppl:.4f}", f"{lc['float']['ppl']:.4f}",
             f"{100 * (lc['float']['ppl'] / ours['float'].ppl - 1):+.3f}%", f"{float_gguf.stat().st_size / 1e6:.1f} MB (F32)"],
            ["GPTQ W4 g64 sym", f"{ours['gptq'].ppl:.4f}", f"{lc['gptq']['ppl']:.4f}",
             f"{100 * (lc['gptq']['ppl'] / ours['gptq'].ppl - 1):+.3f}%",
             f"{(WORK / 'gptq' / 'model.gguf').stat().st_size / 1e6:.1f} MB ({', '.join(types)})"]]
    rows += parity(G, protocol, a.threads)
    headers = ["model", "frugal / transformers ppl", "llama.cpp ppl", "llama.cpp vs frugal", "GGUF"]
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in rows]
    body = (f"The tiny Mixtral of section moe-trained ({a.steps} steps), {ours['float'].tokens} tokens of wikitext-2-raw "
            f"test in windows of 512, the same windows in both engines (llama-cpp-python {G.LLAMA_CPP.split('==')[1]}, "
            f"{a.threads} threads). llama.cpp runs the experts from frugal's `ffn_gate_exps`/`ffn_up_exps`/`ffn_down_exps` "
            f"(arch `llama` with experts) and the router in F32. The tiny random rows check each architecture's "
            f"tensor names, header and routing against llama.cpp's graph (random weights: perplexity near the vocabulary size).\n\n" + "\n".join(md) + "\n")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "moe_gguf.json").write_text(json.dumps({"rows": rows, "llama_cpp": {k: {m: v[m] for m in ("ppl", "nll", "tokens")} for k, v in lc.items()}},
                   indent=2) + "\n")
    publish("moe-gguf", "MoE in llama.cpp: frugal's GGUF of the trained tiny Mixtral", "bench/moe_gguf.py", [], body)


if __name__ == "__main__":
    main()
