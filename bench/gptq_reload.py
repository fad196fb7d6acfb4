"""Reload frugal's GPTQ checkpoints with transformers (+ optimum + GPTQModel) and compare logits.

    .venv/bin/python bench/gptq_reload.py                       # tiny llama, bits 2/3/4/8, sym and asym
    .venv/bin/python bench/gptq_reload.py --family qwen2 --group-size -1 --bits 4
    .venv/bin/python bench/gptq_reload.py --ignore '*.mlp.down_proj' --bits 4
    .venv/bin/python bench/gptq_reload.py --model default --bits 4 --group-size 64   # the real default model
    bench/.venvs/gptqmodel/bin/python bench/gptq_reload.py --reload DIR [DIR ...]   # reload half only

The project venv compresses a tiny random model (tests/conftest.py) with RTN and float16 scales, saves
each result with `--format gptq` into bench/.work/gptq_reload/<name>/, and stores next to it
<name>.ref.safetensors: the token ids, frugal's float32 logits and every quantized layer's float32
weight. The GPTQModel venv (bench/.venvs/gptqmodel, created by bench/peers.py) then reloads each
directory, from a temporary working directory (GPTQModel writes `logs/` there), three ways:

  auto      transformers.AutoModelForCausalLM.from_pretrained(DIR, device_map="cpu"): the kernel GPTQModel
            picks (4 bits: TorchAtenLinear, which casts scales to bfloat16), float32 activations
  torch     the same with backend "gptq_torch" (TorchLinear: dequantize, then matmul); logits with the
            float16 scales as loaded, then with the scales cast to float32 ("exact": the same arithmetic
            as frugal), and the largest difference of its dequantize_weight() to frugal's weights
  native    GPTQModel.load(DIR, device="cpu") with its defaults (bfloat16 model on CPU)

transformers needs `optimum` to load GPTQ; it is installed (no dependencies) into
bench/.venvs/gptqmodel-optimum and put on PYTHONPATH, so the peer venv itself is untouched.
Writes bench/results/gptq_reload.json and prints one line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "gptq_reload"
GPTQ_PY = ROOT / "bench" / ".venvs" / "gptqmodel" / "bin" / "python"
OPTIMUM = ROOT / "bench" / ".venvs" / "gptqmodel-optimum"
OPTIMUM_REQ = "optimum==2.3.0"
RESULTS = ROOT / "bench" / "results" / "gptq_reload.json"


# -- project venv side ----------------------------------------------------------------------------
def prepare(a: argparse.Namespace) -> list[Path]:
    """Compress the tiny model once per (bits, symmetric); save each as GPTQ plus its reference."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model  # noqa: E402

    import frugal

    WORK.mkdir(parents=True, exist_ok=True)
    if a.model:  # a real model: "default" or a path; ids are tokens of the shared evaluation text
        from frugal.load.model import load_model

        loaded = load_model(None if a.model == "default" else a.model)
        src, prefix = loaded.path, "default" if a.model == "default" else Path(a.model).name
        text = (ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.lf.raw").read_text()[:20000]
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :256]
    else:
        src, prefix = build_tiny_model(a.family, WORK / f"src-{a.family}"), a.family
        ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    dirs = []
    for bits in a.bits:
        for sym in a.sym:
            name = f"{prefix}-w{bits}g{a.group_size}-{'sym' if sym else 'asym'}" + ("-ign" if a.ignore else "")
            recipe = {"method": "rtn", "ignore": ["lm_head", *a.ignore],
                      "weights": {"bits": bits, "group_size": a.group_size, "symmetric": sym, "scale_dtype": "float16"}}
            c = frugal.compress(str(src), recipe)
            c.save(WORK / name, overwrite=True, fmt="gptq")
            with torch.no_grad():
                logits = c.model(ids).logits.float()
            mods = dict(c.model.named_modules())
            ref = {"ids": ids, "logits": logits.contiguous(),
                   **{f"weight.{n}": mods[n].weight.detach().float().contiguous() for n in c.quantized}}
            save_file(ref, str(WORK / f"{name}.ref.safetensors"))
            dirs.append(WORK / name)
    return dirs


def ensure_optimum() -> None:
    if (OPTIMUM / "optimum" / "gptq").is_dir():
        return
    subprocess.run([str(GPTQ_PY), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(OPTIMUM), OPTIMUM_REQ],
                   check=True)


def run_reload(dirs: list[Path]) -> list[dict]:
    """Run the reload half in the GPTQModel venv, from a temporary working directory."""
    if not GPTQ_PY.is_file():
        sys.exit(f"{GPTQ_PY}: missing; create it with `.venv/bin/python bench/peers.py --install-only --peers gptqmodel`")
    ensure_optimum()
    env = {**os.environ, "PYTHONPATH": str(OPTIMUM), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as cwd:
        out = Path(cwd) / "results.json"
        proc = subprocess.run([str(GPTQ_PY), str(Path(__file__).resolve()), "--reload", *map(str, dirs),
                               "--json", str(out)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        (WORK / "reload.log").write_text(proc.stdout)
        if proc.returncode != 0 or not out.is_file():
            sys.exit(f"reload failed (exit {proc.returncode}); log: {WORK / 'reload.log'}")
        return json.loads(out.read_text())


# -- GPTQModel venv side --------------------------------------------------------------------------
def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _gptq_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}


def reload_one(d: Path) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file

    ref = load_file(str(d.parent / f"{d.name}.ref.safetensors"))
    ids, logits = ref["ids"], ref["logits"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    r: dict = {"name": d.name, "bits": qc["bits"], "group_size": qc["group_size"], "sym": qc["sym"],
               "checkpoint_format": qc["checkpoint_format"], "logits_max_abs": logits.abs().max().item()}

    def attempt(key, fn):
        t0 = time.perf_counter()
        try:
            r[key] = fn()
        except Exception as e:  # noqa: BLE001 - a failed load is a result to report
            r[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        r[key]["seconds"] = round(time.perf_counter() - t0, 1)

    def auto():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu")
        kernels = sorted({type(x).__name__ for x in _gptq_modules(m).values()})
        with torch.no_grad():
            out = m(ids).logits
        return {"kernels": kernels, "dtype": str(m.dtype), "logits_max_abs_diff": _max_diff(out, logits)}

    def torch_backend():
        cfg = transformers.GPTQConfig(bits=qc["bits"], backend="gptq_torch")
        m = transformers.AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", quantization_config=cfg)
        mods = _gptq_modules(m)
        res = {"kernels": sorted({type(x).__name__ for x in mods.values()}), "dtype": str(m.dtype),
               "quantized_layers": len(mods),
               "expected_layers": sum(1 for k in ref if k.startswith("weight."))}
        with torch.no_grad():
            res["logits_max_abs_diff_fp16_scales"] = _max_diff(m(ids).logits, logits)
            for mod in mods.values():  # same arithmetic as frugal: float32 scale times integer code
                mod.scales = mod.scales.float()
            res["logits_max_abs_diff_fp32_scales"] = _max_diff(m(ids).logits, logits)
            res["weight_max_abs_diff"] = max(_max_diff(mod.dequantize_weight().T, ref[f"weight.{n}"])
                                             for n, mod in mods.items())
        return res

    def native():
        from gptqmodel import GPTQModel

        m = GPTQModel.load(str(d), device="cpu")
        kernels = sorted({type(x).__name__ for x in _gptq_modules(m.model).values()})
        with torch.no_grad():
            out = m.model(ids).logits
        return {"kernels": kernels, "dtype": str(m.model.dtype), "logits_max_abs_diff": _max_diff(out, logits)}

    attempt("auto", auto)
    attempt("torch", torch_backend)
    attempt("native", native)
    return r


def fmt_row(r: dict) -> str:
    def cell(x, key):
        return f"err({x['error'][:60]})" if "error" in x else f"{x[key]:.3g}"

    t = r["torch"]
    exact = cell(t, "logits_max_abs_diff_fp32_scales")
    w = cell(t, "weight_max_abs_diff")
    return (f"{r['name']:<24} {r['checkpoint_format']:<8} auto {cell(r['auto'], 'logits_max_abs_diff'):>9}  "
            f"torch fp16 {cell(t, 'logits_max_abs_diff_fp16_scales'):>9} fp32 {exact:>7} w {w:>5}  "
            f"native {cell(r['native'], 'logits_max_abs_diff'):>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reload", nargs="+", type=Path, help="(GPTQModel venv) reload these directories")
    ap.add_argument("--json", type=Path, help="with --reload: write the results here")
    ap.add_argument("--family", default="llama", help="tiny random model family (tests/conftest.py)")
    ap.add_argument("--model", help="a real model instead: 'default' or an HF directory")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--asym-only", action="store_true")
    ap.add_argument("--sym-only", action="store_true")
    ap.add_argument("--ignore", nargs="*", default=[], help="extra recipe.ignore patterns (layers left in float)")
    a = ap.parse_args()
    if a.reload:
        results = []
        for d in a.reload:
            results.append(reload_one(d))
            print(json.dumps(results[-1]), flush=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    a.sym = [True] if a.sym_only else [False] if a.asym_only else [True, False]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dirs = prepare(a)
    results = run_reload(dirs)
    for r in results:
        print(fmt_row(r))
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    old.update({r["name"]: r for r in results})
    RESULTS.write_text(json.dumps(dict(sorted(old.items())), indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
