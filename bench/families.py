"""Every text decoder transformers builds, as a tiny random model: does frugal compress it (GPTQ and RTN, W4
g32), does plain transformers reload the output to frugal's own result, and is every decoder weight matrix
(experts included) quantized?

    .venv/bin/python bench/families.py                 # every causal-LM family (~1 h on 2 cores)
    .venv/bin/python bench/families.py mixtral qwen3   # some families (not published)
    .venv/bin/python bench/families.py --rerun-failed  # the families the last full run failed, merged
    .venv/bin/python bench/families.py --rerun-failed jetmoe   # those and the named ones, merged

Each family runs in its own process (a crash or a hang costs that family only). Prints a table and rewrites
the `families` section of docs/benchmarks.md; per-family details in bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import publish  # noqa: E402

RECIPES = {"gptq": {"method": "gptq", "weights": {"bits": 4, "group_size": 32},
                    "calibration": {"num_samples": 4, "seq_len": 64}, "storage": {"dtype": "float32"}, "seed": 0},
           "rtn": {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "storage": {"dtype": "float32"},
                   "seed": 0}}
RELOAD_KL = 1e-3
TIMEOUT = 300


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _float_matrices(model, quantized) -> list[str]:
    """Decoder weight matrices left float: linears not quantized other than the head and routers, and
    3-D expert parameters frugal did not unfuse."""
    import torch

    from frugal.load.blocks import find_blocks
    from frugal.load.experts import routers

    name, _ = find_blocks(model)
    skip = routers(model)
    out = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(name + ".")
           and n not in quantized and id(m) not in skip]
    from frugal.load.experts import is_fused_experts

    out += [n for n, m in model.named_modules() if is_fused_experts(m)]
    # expert stacks outside transformers' experts interface (JetMoE's ParallelExperts): 3-D float weights
    out += [n for n, m in model.named_modules() if n.startswith(name + ".") and type(m).__name__.endswith("Experts")
            and not is_fused_experts(m) and any(p.dim() == 3 for p in m.parameters(recurse=False))]
    return out


def one(family: str) -> dict:
    """Compress, save and reload one family with each recipe; what happened, by stage."""
    import logging

    import torch
    import transformers

    import frugal
    from frugal.errors import FrugalError
    from frugal.exporters.compressed_tensors import has_packed_conv1d
    from frugal.load.model import load_model, shared_dir
    from zoo import build

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    res: dict = {"family": family}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        try:
            build(family, src, shared_dir() / "models" / "tokenizer-512")
        except Exception as e:
            return res | {"stage": "build", "error": _first_line(e)}
        ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
        for key, recipe in RECIPES.items():
            stage = "compress"
            try:
                c = frugal.compress(src, recipe, shared_dir() / "data/wikitext-2/valid.txt")
                with torch.no_grad():
                    ref = torch.log_softmax(c.model(ids, use_cache=False).logits.float(), -1)
                floats = _float_matrices(c.model, c.quantized)
                stage = "save"
                c.save(Path(tmp) / key)
                stage = "reload"
                if has_packed_conv1d(c.model, c.quantized):  # upstream: compressed-tensors quantizes nn.Linear only
                    stage, plain = "frugal reader", load_model(Path(tmp) / key).model
                    res["reader_only"] = "plain transformers cannot load packed Conv1D layers (compressed-tensors)"
                else:
                    plain = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / key, dtype=torch.float32)
                with torch.no_grad():
                    lp = torch.log_softmax(plain(ids, use_cache=False).logits.float(), -1)
                kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
                stage = "frugal reader"
                load_model(Path(tmp) / key)
            except FrugalError as e:
                return res | {"stage": stage, "method": key, "error": str(e)[:200], "clean": True}
            except Exception as e:
                return res | {"stage": stage, "method": key, "error": _first_line(e), "clean": False}
            res[key] = {"kl": kl, "float": floats[:5], "n_float": len(floats), "quantized": len(c.quantized),
                        "experts": sum(".experts." in n for n in c.quantized)}
            if not kl < RELOAD_KL:
                return res | {"stage": "reload", "method": key, "error": f"KL {kl:.2e} to frugal's result", "clean": False}
        res["stage"] = "float" if any(res[k]["n_float"] for k in RECIPES) else "reader" if "reader_only" in res else "ok"
    return res


def run_all(families: list[str]) -> list[dict]:
    from tqdm.auto import tqdm

    out = []
    for fam in tqdm(families, desc="families", unit="family"):
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", fam], capture_output=True, text=True, timeout=TIMEOUT)
            line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{")), None)
            r = json.loads(line) if line else {"family": fam, "stage": "crash",
                                               "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        except subprocess.TimeoutExpired:
            r = {"family": fam, "stage": "timeout", "error": f"over {TIMEOUT} s"}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        out.append(r)
    return out


def summary(results: list[dict]) -> str:
    built = [r for r in results if r["stage"] != "build"]
    ok = [r for r in built if r["stage"] == "ok"]
    moe = [r for r in built if r.get("gptq", {}).get("experts")]
    by_stage: dict[str, list[str]] = {}
    for r in built:
        if r["stage"] != "ok":
            by_stage.setdefault(r["stage"], []).append(r["family"])
    lines = [f"{len(results)} causal-LM families in transformers; {len(built)} build as tiny random models "
             f"(the others: the shrunk config is invalid, listed in bench/results/families.json). Of those, "
             f"**{len(ok)} ({100 * len(ok) / max(len(built), 1):.0f} %) compress with GPTQ and RTN (W4 g32), reload in "
             f"plain transformers with KL < {RELOAD_KL:g} to frugal's result, and leave no decoder matrix float**; "
             f"{len(moe)} of them with MoE experts quantized one by one.", "",
             "| outcome | families | which |", "|---|---|---|",
             f"| ok | {len(ok)} | {', '.join(r['family'] for r in ok)} |"]
    for stage, fams in sorted(by_stage.items()):
        lines.append(f"| {stage} | {len(fams)} | {', '.join(fams)} |")
    reader = [r for r in built if r["stage"] == "reader"]
    if reader:
        lines += ["", f"`reader`: compressed like the others, reloaded with KL < {RELOAD_KL:g} by frugal's reader "
                  f"(`frugal.load_model`) because {reader[0]['reader_only']}; plain transformers refuses them "
                  f"with a shape error (never a random initialisation)."]
    lines += ["", "| family | stage | what failed |", "|---|---|---|"]
    lines += [f"| {r['family']} | {r['stage']}{'' if r.get('clean', True) else ' (traceback)'} | "
              f"{r.get('error') or ', '.join(r.get('gptq', {}).get('float', []))} |"
              for r in built if r["stage"] not in ("ok", "reader")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="model types (default: every causal-LM family)")
    ap.add_argument("--rerun-failed", action="store_true",
                    help="re-run only the families that failed in bench/results/families.json (after a fix) and merge")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return
    from zoo import causal_families

    import transformers

    saved = ROOT / "bench" / "results" / "families.json"
    note = ""
    if a.rerun_failed:
        results = json.loads(saved.read_text())["results"]
        failed = [r["family"] for r in results if r["stage"] not in ("ok", "build")]
        redone = {r["family"]: r for r in run_all(failed + a.families)}
        results = [redone.get(r["family"], r) for r in results]
        named = f" (and {', '.join(a.families)}, after a change to the check)" if a.families else ""
        note = f"The {len(failed)} families that failed the full run{named} were re-run after the fixes it showed. "
    else:
        results = run_all(a.families or causal_families())
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    whole = a.rerun_failed or not a.families  # every family's row: saved and published
    if whole:
        (ROOT / "bench" / "results" / "families.json").write_text(json.dumps(
            {"transformers": transformers.__version__, "results": results}, indent=2) + "\n")
    publish("families", "Every causal-LM family: compress, reload, nothing left float", "bench/families.py",
            ["--rerun-failed"] if a.rerun_failed else [],
            f"transformers {transformers.__version__}. {note}" + summary(results), docs=whole)


if __name__ == "__main__":
    main()
