"""frugal against peer libraries: same model, same calibration tokens, same evaluation tokens.

    .venv/bin/python bench/peers.py                     # every peer, 128 x 512 calibration, 40 windows
    .venv/bin/python bench/peers.py --quick --peers hqq # one peer, 16 x 512 calibration, 8 windows
    .venv/bin/python bench/peers.py --install-only      # only create the peer virtualenvs

Each peer library gets its own virtualenv under bench/.venvs/<venv> (created here: the local CPU
torch wheel first, then the peer pinned, with constraints.txt so no CUDA torch is pulled) and runs
bench/peers/run_<peer>.py there as a subprocess. The runner quantizes the float model with the peer's
own API and writes the resulting weights dequantized to float32 into a plain HF directory, which is
then evaluated here, in the project venv, with frugal's protocol against the original, all models
on the same windows. Every output is checked to lie on a (2^bits)-level grid per group of
`group` inputs, its untouched tensors to equal the original's, and the runner's float model to give
the same logits as the project's (so a peer's transformers read the model the same way).

Prints a table, writes bench/results/peers.json and the `peers` section of docs/benchmarks.md.
Work files (calibration tensor, outputs, logs) go to bench/.work/, virtualenvs to bench/.venvs/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENVS = BENCH / ".venvs"
WORK = BENCH / ".work"
LOGS = WORK / "logs"
sys.path.insert(0, str(BENCH))

from common import write_section  # noqa: E402

log = logging.getLogger("peers")

TORCH = "torch==2.13.0"  # the local CPU wheel (find-links); constraints.txt pins it for every later install
COMMON_REQS = ["safetensors", "tqdm"]

# virtualenv name -> pip requirements of the peer (installed with -c constraints.txt)
VENV_REQS: dict[str, list[str]] = {
    "llmcompressor": ["llmcompressor==0.14.0.1"],
    "gptqmodel": ["gptqmodel==7.6.0"],
    "autoround": ["auto-round==0.16.1"],
    "hqq": ["hqq==0.2.8", "transformers", "accelerate"],
    "torchao": ["torchao==0.18.0", "transformers", "accelerate"],
    "quanto": ["optimum-quanto==0.2.7", "transformers", "accelerate"],
    "nncf": ["nncf==3.4.0", "openvino==2026.4.1", "transformers==5.24.0"],
}
# import name of each venv's peer package, for its version
VENV_MODULE = {"llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel", "autoround": "auto_round",
               "hqq": "hqq", "torchao": "torchao", "quanto": "optimum.quanto", "nncf": "nncf"}
VENV_DIST = {"llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel", "autoround": "auto-round",
             "hqq": "hqq", "torchao": "torchao", "quanto": "optimum-quanto", "nncf": "nncf"}


@dataclass
class Peer:
    key: str
    library: str
    method: str
    venv: str | None  # None: the project venv (frugal itself)
    runner: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    calibrated: bool = True
    transformed: bool = False  # changes tensors besides the linears (AWQ folding, rotation): whole state saved
    symmetric: bool = True  # the grid asked for (a runner's own report wins); --asym in args makes it False

    def __post_init__(self):
        if "--asym" in self.args:
            self.symmetric = False


PEERS = [
    Peer("frugal-rtn", "frugal", "RTN", None, "run_frugal.py", ["--method", "rtn"], calibrated=False),
    Peer("frugal-gptq", "frugal", "GPTQ", None, "run_frugal.py", ["--method", "gptq"]),
    Peer("frugal-hqq", "frugal", "HQQ (asymmetric)", None, "run_frugal.py", ["--method", "hqq", "--asym"],
         calibrated=False),
    Peer("frugal-awq-gptq", "frugal", "AWQ scales + GPTQ (asymmetric)", None, "run_frugal.py",
         ["--method", "gptq", "--awq", "scales", "--asym"], transformed=True),
    Peer("frugal-rot-gptq", "frugal", "Hadamard rotation + GPTQ", None, "run_frugal.py",
         ["--method", "gptq", "--rotate"], transformed=True),
    Peer("frugal-rot-awq-gptq", "frugal", "rotation + AWQ scales + GPTQ (asymmetric)", None, "run_frugal.py",
         ["--method", "gptq", "--rotate", "--awq", "scales", "--asym"], transformed=True),
    Peer("frugal-awq-gptq-refine", "frugal", "AWQ scales + GPTQ + block refinement (asymmetric)", None,
         "run_frugal.py", ["--method", "gptq", "--awq", "scales", "--asym", "--refine"], transformed=True),
    Peer("frugal-rot-awq-gptq-refine", "frugal", "rotation + AWQ scales + GPTQ + block refinement (asymmetric)",
         None, "run_frugal.py", ["--method", "gptq", "--rotate", "--awq", "scales", "--asym", "--refine"],
         transformed=True),
    Peer("llmcompressor-rtn", "llm-compressor", "RTN (QuantizationModifier)", "llmcompressor",
         "run_llmcompressor.py", ["--method", "rtn"], calibrated=False),
    Peer("llmcompressor-gptq", "llm-compressor", "GPTQ (GPTQModifier)", "llmcompressor",
         "run_llmcompressor.py", ["--method", "gptq"]),
    Peer("llmcompressor-rtn-asym", "llm-compressor", "RTN (QuantizationModifier), asymmetric", "llmcompressor",
         "run_llmcompressor.py", ["--method", "rtn", "--asym"], calibrated=False),
    Peer("llmcompressor-gptq-asym", "llm-compressor", "GPTQ (GPTQModifier), asymmetric", "llmcompressor",
         "run_llmcompressor.py", ["--method", "gptq", "--asym"]),
    Peer("gptqmodel", "GPTQModel", "GPTQ", "gptqmodel", "run_gptqmodel.py",
         env={"GPTQMODEL_CPU_WORKERS": "2"}),
    Peer("gptqmodel-asym", "GPTQModel", "GPTQ, asymmetric (sym=False)", "gptqmodel", "run_gptqmodel.py", ["--asym"],
         env={"GPTQMODEL_CPU_WORKERS": "2"}),
    Peer("autoround", "AutoRound", "AutoRound (signed rounding)", "autoround", "run_autoround.py"),
    Peer("autoround-fast", "AutoRound", "AutoRound (signed rounding), iters=50, nsamples=32, seqlen=512, amp=False "
         "(float32 instead of its bf16 autocast)", "autoround", "run_autoround.py",
         ["--iters", "50", "--nsamples", "32", "--kw", "amp=false"]),
    Peer("nncf-int4-sym", "NNCF", "compress_weights INT4_SYM (data-free)", "nncf", "run_nncf.py",
         ["--method", "int4_sym"], calibrated=False),
    Peer("nncf-int4-asym", "NNCF", "compress_weights INT4_ASYM (data-free)", "nncf", "run_nncf.py",
         ["--method", "int4_asym"], calibrated=False, symmetric=False),
    Peer("nncf-awq-se", "NNCF", "compress_weights INT4_ASYM + AWQ + scale estimation, subset_size=32 (the first 32 "
         "calibration sequences; 128 spend ~26 min in its statistics pass alone on this CPU)", "nncf", "run_nncf.py",
         ["--method", "int4_asym+awq+se", "--nsamples", "32"], symmetric=False),
    Peer("nncf-awq-se-gptq", "NNCF", "compress_weights INT4_ASYM + AWQ + scale estimation + GPTQ, subset_size=16",
         "nncf", "run_nncf.py", ["--method", "int4_asym+awq+se+gptq", "--nsamples", "16"], symmetric=False),
    Peer("hqq", "HQQ", "HQQ (calibration-free)", "hqq", "run_hqq.py", calibrated=False, symmetric=False),
    Peer("torchao", "torchao", "IntxWeightOnly (RTN)", "torchao", "run_torchao.py", calibrated=False),
    Peer("quanto", "optimum-quanto", "qint4 weights (RTN)", "quanto", "run_quanto.py", calibrated=False,
         symmetric=False),
]
PEER_KEYS = [p.key for p in PEERS]


def first_line(text: str, limit: int = 200) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return "(no message)"


def last_error(text: str, limit: int = 240) -> str:
    """The most telling line of a failed command's output: the last exception line, else the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)|ERROR:|error:)", ln):
            return ln[:limit]
    return (lines[-1] if lines else "(no output)")[:limit]


# ----------------------------------------------------------------------------------------------- venvs

def venv_python(venv: str | None) -> Path:
    return Path(sys.executable) if venv is None else VENVS / venv / "bin" / "python"


def ensure_venv(venv: str, reinstall: bool = False) -> tuple[bool, str]:
    """Create bench/.venvs/<venv> with the pinned peer; reuse it when its stamp matches. (ok, message)"""
    reqs = VENV_REQS[venv]
    path = VENVS / venv
    stamp = path / ".frugal-installed"
    want = json.dumps({"torch": TORCH, "reqs": reqs + COMMON_REQS})
    if not reinstall and stamp.is_file() and stamp.read_text() == want:
        return True, "reused"
    if path.exists():
        shutil.rmtree(path)
    LOGS.mkdir(parents=True, exist_ok=True)
    logfile = LOGS / f"install-{venv}.log"
    py = path / "bin" / "python"
    steps = [
        [_base_python(), "-m", "venv", str(path)],
        [str(py), "-m", "pip", "install", TORCH],
        [str(py), "-m", "pip", "install", "-c", str(ROOT / "constraints.txt"), *reqs, *COMMON_REQS],
    ]
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        for cmd in steps:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_clean_env())
            if r.returncode != 0:
                f.flush()
                step = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))[:120]
                return False, f"install failed at `{step}`: {last_error(logfile.read_text())}"
        r = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
        f.write(f"torch in venv: {r.stdout.strip()} {r.stderr.strip()}\n")
        if r.returncode != 0 or not r.stdout.startswith("2.13.0"):
            return False, f"venv torch is {first_line(r.stdout or r.stderr)}, expected 2.13.0 (CPU)"
    stamp.write_text(want)
    log.info("%s: venv ready in %.0f s (log %s)", venv, time.perf_counter() - t0, logfile)
    return True, "installed"


def _base_python() -> str:
    """A Python outside any venv, to create the peer venvs from."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else Path(sys.base_prefix) / "bin" / "python3")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return env


def venv_versions(venv: str | None) -> dict[str, str]:
    py = venv_python(venv)
    dists = ["torch", "transformers", "compressed-tensors", "accelerate"]
    if venv is None:
        dists = ["frugal"] + dists
    else:
        dists = [VENV_DIST[venv]] + dists
        if venv == "llmcompressor":
            dists.append("datasets")
        if venv == "nncf":
            dists.append("openvino")
    code = ("import json, importlib.metadata as m\nout = {}\n"
            f"for d in {dists!r}:\n    try: out[d] = m.version(d)\n    except Exception: pass\nprint(json.dumps(out))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_clean_env())
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return {}


# ------------------------------------------------------------------------------------------- inputs

def peer_source(orig: Path) -> Path:
    """WORK/source: the original model as older transformers (4.x, in some peer venvs) read it too.

    The cached config is written by transformers 5 (`rope_parameters`, `dtype`, tokenizer class
    `TokenizersBackend`); transformers 4 would silently fall back to the default rope_theta and fail
    on the tokenizer class. The copy adds the legacy keys; the weights are a symlink.
    """
    src = WORK / "source"
    src.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((orig / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    (src / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok = json.loads((orig / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (src / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    for f in ("tokenizer.json", "generation_config.json", "chat_template.jinja"):
        if (orig / f).is_file():
            shutil.copy2(orig / f, src / f)
    link = src / "model.safetensors"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(orig / "model.safetensors")
    return src


def calibration_file(tokenizer, n: int, seq_len: int) -> Path:
    """The calibration token ids every library reads (frugal.calibrate.from_text, seed 0), made once."""
    import torch
    from safetensors.torch import load_file, save_file

    from frugal.calibrate import from_text
    from frugal.load.model import shared_dir

    path = WORK / f"calib-n{n}-l{seq_len}-s0.safetensors"
    if path.is_file():
        ids = load_file(str(path))["input_ids"]
        if tuple(ids.shape) == (n, seq_len):
            return path
    ids = from_text(tokenizer, shared_dir() / "data" / "wikitext-2" / "valid.txt", n, seq_len, seed=0)
    save_file({"input_ids": ids.to(torch.int64).contiguous()}, str(path))
    return path


# ------------------------------------------------------------------------------------------- running

def run_peer(peer: Peer, src: Path, orig: Path, calib: Path, out: Path, a, frugal_src: Path | None = None) -> dict:
    """Run one runner in its venv; returns the parent-side record (wall time, peak RSS, exit, error).
    `frugal_src`: the frugal sources a project-venv runner imports (default this tree's src/)."""
    py = venv_python(peer.venv)
    cmd = [str(py), str(BENCH / "peers" / peer.runner), "--model", str(src if peer.venv else orig),
           "--orig", str(orig), "--calib", str(calib), "--out", str(out), "--bits", str(a.bits),
           "--group", str(a.group), *peer.args]
    if a.quick:
        cmd.append("--quick")
    if peer.key == "autoround" and a.autoround_iters is not None:
        cmd += ["--iters", str(a.autoround_iters)]
    threads = str(a.threads)
    # one torch thread per runner when two run at once: two 2-thread processes on 2 cores ran ~5x slower here
    env = _clean_env() | peer.env | {
        "PEER_THREADS": threads, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if peer.venv is None:
        env["PYTHONPATH"] = str(frugal_src or ROOT / "src")
    logfile = LOGS / f"{out.parent.name}-{peer.key}.log"
    rec = {"command": " ".join(cmd), "log": str(logfile.relative_to(ROOT))}
    t0 = time.perf_counter()
    limit = a.autoround_timeout if peer.key == "autoround" and a.autoround_timeout else a.timeout
    deadline = t0 + limit * 60
    with open(logfile, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
        next_beat = t0 + 60
        status, usage, timed_out = None, None, False
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status, usage = st, ru
                break
            now = time.perf_counter()
            if now > deadline and not timed_out:
                timed_out = True
                log.warning("%s: timeout after %.0f min, stopping it", peer.key, limit)
                os.killpg(proc.pid, signal.SIGTERM)
                deadline = now + 30
            elif timed_out and now > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            if now > next_beat:
                next_beat = now + 60
                log.info("%s: running %.0f s ... %s", peer.key, now - t0, _last_progress(logfile))
            time.sleep(1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    rec["wall_seconds"] = time.perf_counter() - t0
    rec["peak_rss_kb"] = usage.ru_maxrss
    rec["exit_code"] = proc.returncode
    if timed_out:
        last = _last_progress(logfile)
        m = re.findall(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)", last)
        if m and int(m[-1][0]) == 0:
            where = (f"before the first of {m[-1][1]} steps ({last.split(':')[0][:60]}) finished: "
                     f"more than {limit * int(m[-1][1]) / 60:.0f} h for all {m[-1][1]} at that rate")
        elif m:
            where = f"at {m[-1][0]}/{m[-1][1]} after {m[-1][2]}, its own estimate of the rest {m[-1][3]}"
        else:
            where = f"last progress: {last}"
        rec["error"] = f"stopped at the {limit:.0f} min limit, {where}"
    return rec


def _last_progress(logfile: Path) -> str:
    """The last non-empty line (or tqdm update) of a log, for progress messages."""
    try:
        tail = logfile.read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
    parts = [p.strip() for p in re.split(r"[\r\n]+", tail) if p.strip()]
    bars = [p for p in parts if re.search(r"\d+/\d+ \[[\d:]+<", p)]
    return (bars or parts or [""])[-1][:200]


# ------------------------------------------------------------------------------------------- checks

LINEAR_RE = re.compile(r"^model\.layers\.\d+\..*\.weight$")


def grid_check(deq: Path, orig: Path, bits: int, group: int, transformed: bool = False) -> dict:
    """Every decoder linear weight has at most 2^bits distinct values in each group of `group` inputs;
    every other tensor is the original's (unless the recipe `transformed` the model: AWQ folding or a
    rotation change norms/embeddings and may add an untied head); how many weights moved."""
    import torch
    from safetensors.torch import load_file

    a, o = load_file(str(deq / "model.safetensors")), load_file(str(orig / "model.safetensors"))
    added = sorted(set(a) - set(o))
    if set(o) - set(a) or (added and not (transformed and added == ["lm_head.weight"])):
        return {"ok": False, "why": f"tensor names differ from the original ({len(set(a) ^ set(o))} differ)"}
    worst, checked, moved, total, bad, other_changed = 0, 0, 0, 0, [], []
    for k in sorted(a):
        if k.endswith("proj.weight") and LINEAR_RE.match(k):
            w = a[k]
            if w.shape[1] % group:
                bad.append(f"{k}: {w.shape[1]} inputs not divisible by {group}")
                continue
            g = w.reshape(-1, group).sort(dim=1).values
            distinct = 1 + (g[:, 1:] != g[:, :-1]).sum(1)
            worst = max(worst, int(distinct.max()))
            if int(distinct.max()) > 2 ** bits:
                bad.append(f"{k}: up to {int(distinct.max())} distinct values per group of {group}")
            moved += int((w != o[k]).sum())
            total += w.numel()
            checked += 1
        elif k in o and not torch.equal(a[k], o[k]):
            other_changed.append(k)
    changed_by_transform = other_changed if transformed else []
    other_changed = [] if transformed else other_changed
    ok = not bad and not other_changed and checked > 0 and moved > 0
    why = "; ".join(bad[:2] + ([f"non-linear tensors changed: {other_changed[:3]}"] if other_changed else [])
                    + (["no weight changed"] if moved == 0 else []))
    return {"ok": ok, "linears": checked, "max_distinct_per_group": worst, "moved_fraction": moved / max(total, 1),
            "why": why, "changed_by_transform": len(changed_by_transform),
            "added_head_bytes": sum(a[k].numel() * 2 for k in added)}


def saved_linear_bytes(saved: Path) -> tuple[int, int]:
    """(bytes of the quantized decoder linears' tensors, bytes of all safetensors) of a saved checkpoint."""
    from safetensors import safe_open

    lin, tot = 0, 0
    for f in sorted(saved.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shape = sl.get_shape()
                n = 1
                for d in shape:
                    n *= d
                size = n * _dtype_size(sl.get_dtype())
                tot += size
                if k.startswith("model.layers.") and re.search(r"_proj\.", k):
                    lin += size
    return lin, tot


def _dtype_size(dt: str) -> float:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dt, 4)


# ------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=",".join(PEER_KEYS),
                    help=f"comma-separated subset of: {', '.join(PEER_KEYS)} (default: all)")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences of 512 tokens (default 128)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens (default 40)")
    ap.add_argument("--quick", action="store_true", help="16 calibration samples, 8 evaluation windows")
    ap.add_argument("--bits", type=int, default=4, choices=(3, 4))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=60, help="minutes per peer runner (default 60)")
    ap.add_argument("--autoround-timeout", type=float, default=None,
                    help="minutes for the AutoRound runner (default: --timeout)")
    ap.add_argument("--autoround-iters", type=int, default=None,
                    help="AutoRound iterations per block (default: its own, 200; --quick: 20)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="peer runners at once (default 1; more finishes sooner but their times and RAM overlap)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per runner (default: CPU count // jobs, at least 1)")
    ap.add_argument("--eval-threads", type=int, default=None,
                    help="torch threads for the evaluation (default: torch's own; 1 is faster when the CPU is shared)")
    ap.add_argument("--reuse", action="store_true",
                    help="do not re-run a peer that has an output (or a recorded failure) from a run with the same settings")
    ap.add_argument("--install-only", action="store_true", help="only create the peer virtualenvs")
    ap.add_argument("--reinstall", action="store_true", help="recreate the peer virtualenvs")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the docs section from the recorded bench/results/peers[-wN].json with the "
                         "current table code (no runs, no evaluation; pass the --threads/--eval-threads it ran with)")
    ap.add_argument("--merge", action="store_true",
                    help="add the selected peers' rows to the recorded results of an earlier run with the same "
                         "protocol (its other rows are kept as recorded; evaluation is per model)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    selected = [k.strip() for k in a.peers.split(",") if k.strip()]
    unknown = [k for k in selected if k not in PEER_KEYS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; known: {PEER_KEYS}")
    peers = [p for p in PEERS if p.key in selected]
    if a.quick:
        a.samples, a.windows = 16, 8
        if a.autoround_iters is None:
            a.autoround_iters = 20
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 1) // a.jobs)
    if a.render:
        render_recorded(a)
        return
    t_start = time.perf_counter()
    LOGS.mkdir(parents=True, exist_ok=True)

    install: dict[str, tuple[bool, str]] = {}
    for v in dict.fromkeys(p.venv for p in peers if p.venv):
        log.info("%s: preparing venv bench/.venvs/%s", v, v)
        try:
            install[v] = ensure_venv(v, a.reinstall)
        except Exception as e:  # noqa: BLE001 - a broken install is a row, not the end of the run
            install[v] = (False, f"install failed: {type(e).__name__}: {first_line(str(e))}")
        if not install[v][0]:
            log.error("%s: %s", v, install[v][1])
    if a.install_only:
        for v, (ok, msg) in install.items():
            print(f"{v}: {'ok' if ok else 'FAILED'} ({msg})")
        return

    import torch
    import transformers

    from frugal.evaluation.metrics import Protocol, evaluate
    from frugal.load.model import load_model, shared_dir
    from frugal.report.table import table

    transformers.logging.set_verbosity_error()
    loaded = load_model(None)
    orig = Path(loaded.path)
    src = peer_source(orig)
    calib = calibration_file(loaded.tokenizer, a.samples, 512)
    tag = f"{'quick-' if a.quick else ''}n{a.samples}-w{a.bits}g{a.group}"
    rundir = WORK / tag
    log.info("model %s, calibration %s, outputs in %s", orig, calib.name, rundir)

    records: dict[str, dict] = {p.key: {"peer": p.key, "library": p.library, "method": p.method, "venv": p.venv}
                                for p in peers}

    def one(peer: Peer) -> None:
        out = rundir / peer.key
        rec = records[peer.key]
        if peer.venv and not install[peer.venv][0]:
            rec["error"] = install[peer.venv][1]
            return
        parent_file = out / "parent.json"
        if a.reuse and parent_file.is_file() and (out / "result.json").is_file():
            prev = json.loads(parent_file.read_text())
            if prev.get("autoround_iters") == a.autoround_iters:  # a failure is reused too (as its row)
                log.info("%s: reusing %s%s", peer.key, out, " (failed run)" if "error" in prev else "")
                rec.update(prev)
                rec["reused"] = True
        if not rec.get("reused"):
            where = f"bench/.venvs/{peer.venv}" if peer.venv else "the project venv"
            log.info("%s: running %s in %s", peer.key, peer.runner, where)
            rec.update(run_peer(peer, src, orig, calib, out, a))
            rec["autoround_iters"] = a.autoround_iters
        res_file = out / "result.json"
        res = json.loads(res_file.read_text()) if res_file.is_file() else {}
        rec["runner"] = res
        if "error" not in rec:
            if res.get("error"):
                rec["error"] = res["error"]
            elif rec.get("exit_code", 0) != 0 or not (out / "deq" / "model.safetensors").is_file():
                why = last_error((ROOT / rec["log"]).read_text())
                rec["error"] = f"runner exited {rec.get('exit_code')}: {why}"
        if not rec.get("reused") and out.is_dir():
            parent_file.write_text(json.dumps({k: v for k, v in rec.items() if k != "runner"}, indent=2) + "\n")
        if "error" in rec:
            log.error("%s: %s", peer.key, rec["error"])
        else:
            log.info("%s: done in %.0f s (quantization %.0f s), peak RSS %.2f GB", peer.key, rec["wall_seconds"],
                     res.get("quant_seconds", float("nan")), rec["peak_rss_kb"] / 1e6)

    if a.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        slow_first = sorted(peers, key=lambda p: (not p.calibrated, p.key == "autoround"))
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(one, slow_first))
    else:
        for peer in peers:
            one(peer)

    # checks, sizes
    ref_lp_cache = {}
    for key, rec in records.items():
        if "error" in rec:
            continue
        out = rundir / key
        transformed = next(p.transformed for p in peers if p.key == key)
        rec["grid"] = grid_check(out / "deq", orig, a.bits, a.group, transformed)
        if not rec["grid"]["ok"]:
            rec["error"] = f"output is not on a {a.bits}-bit grid per group of {a.group}: {rec['grid']['why']}"
            log.error("%s: %s", key, rec["error"])
            continue
        rec["float_check"] = float_logit_check(loaded.model, calib, out, ref_lp_cache)
        if (out / "saved").is_dir():
            lin, tot = saved_linear_bytes(out / "saved")
            rec["bytes"], rec["bytes_source"], rec["saved_total_bytes"] = lin, "saved", tot
        else:
            rec["bytes"], rec["bytes_source"] = rec["runner"].get("computed_bytes"), "computed"

    # evaluation: every good output plus the original, window by window on the same tokens
    protocol = Protocol(text=str(shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"), seq_len=512,
                        max_tokens=512 * a.windows)
    good = [k for k, r in records.items() if "error" not in r]
    if a.eval_threads:
        torch.set_num_threads(a.eval_threads)
    models = {k: load_model(rundir / k / "deq").model for k in good}
    log.info("evaluating %d models and the original on %d windows of 512", len(models), a.windows)
    t_eval = time.perf_counter()
    results = {r.name: r for r in evaluate(models, loaded.tokenizer, protocol, ref=loaded.model, ref_name="original")}
    eval_seconds = time.perf_counter() - t_eval
    for k in good:
        records[k]["eval"] = results[k].to_dict()

    versions = {"project venv": venv_versions(None)}
    for v in dict.fromkeys(p.venv for p in peers if p.venv):
        if install.get(v, (False,))[0]:
            versions[v] = venv_versions(v)
    name = f"peers{'-quick' if a.quick else ''}{'' if a.bits == 4 else f'-w{a.bits}'}.json"
    cmd = "make setup && .venv/bin/python bench/peers.py" + _flags(a, selected)
    if a.merge:
        records, versions, cmd = _merge(BENCH / "results" / name, records, versions, cmd, results["original"], a)
    headers, rows = _rows(records, results["original"], a)
    print(table(headers, rows))
    total_seconds = time.perf_counter() - t_start
    out = {"command": cmd, "samples": a.samples, "seq_len": 512, "bits": a.bits, "group_size": a.group,
           "protocol": protocol.__dict__, "eval_tokens": results["original"].tokens, "eval_seconds": eval_seconds,
           "total_seconds": total_seconds, "versions": versions, "original": results["original"].to_dict(),
           "peers": records}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / name).write_text(json.dumps(out, indent=2, default=str) + "\n")
    log.info("wrote bench/results/%s; total %.1f min", name, total_seconds / 60)
    if not a.no_docs and not a.quick:
        body = _doc_body(records, headers, rows, versions, a, results["original"], total_seconds)
        write_section(ROOT / "docs" / "benchmarks.md", "peers" if a.bits == 4 else f"peers-w{a.bits}",
                      f"frugal and peer libraries, W{a.bits} g{a.group}, on the default model", cmd, body)
        log.info("rewrote docs/benchmarks.md section %s", "peers" if a.bits == 4 else f"peers-w{a.bits}")


def render_recorded(a) -> None:
    """Rewrite the docs section of --bits from its recorded results, as the last run would have with this code."""
    from types import SimpleNamespace

    import torch

    name = f"peers{'' if a.bits == 4 else f'-w{a.bits}'}.json"
    rec = json.loads((BENCH / "results" / name).read_text())
    a.samples, a.group = rec["samples"], rec["group_size"]
    a.windows = rec["protocol"]["max_tokens"] // rec["seq_len"]
    if a.eval_threads:
        torch.set_num_threads(a.eval_threads)
    ref = SimpleNamespace(**rec["original"])
    headers, rows = _rows(rec["peers"], ref, a)
    body = _doc_body(rec["peers"], headers, rows, rec.get("versions", {}), a, ref, rec["total_seconds"])
    write_section(ROOT / "docs" / "benchmarks.md", "peers" if a.bits == 4 else f"peers-w{a.bits}",
                  f"frugal and peer libraries, W{a.bits} g{a.group}, on the default model", rec["command"], body)
    log.info("rewrote docs/benchmarks.md section %s from bench/results/%s", name[:-5], name)


MERGE_PPL_RTOL = 1e-3  # the original's perplexity may move this much (library versions) between merged runs


def _merge(path: Path, records: dict, versions: dict, cmd: str, original, a) -> tuple[dict, dict, str]:
    """The earlier run's records (from `path`) with this run's rows added or replaced, in PEERS order; the
    protocol (calibration, windows, bits, group) must be the same and the original's perplexity within
    MERGE_PPL_RTOL (each new row records the original's perplexity of its run). On a mismatch this run's
    rows are kept in `<name>.unmerged.json` before stopping."""
    if not path.is_file():
        raise SystemExit(f"--merge: {path} not found (run without --merge first)")
    prev = json.loads(path.read_text())
    same = (prev["samples"] == a.samples and prev["protocol"]["max_tokens"] == 512 * a.windows
            and prev["bits"] == a.bits and prev["group_size"] == a.group)
    drift = abs(prev["original"]["ppl"] - original.ppl) / prev["original"]["ppl"]
    for r in records.values():
        r["original_ppl"] = original.ppl
    if not same or drift > MERGE_PPL_RTOL:
        side = path.with_suffix(".unmerged.json")
        side.write_text(json.dumps({"original": original.to_dict(), "peers": records}, indent=2, default=str) + "\n")
        raise SystemExit(f"--merge: {path} was made with another protocol (samples, windows, bits, group, or the "
                         f"original's ppl {prev['original']['ppl']:.6f} recorded vs {original.ppl:.6f} now); "
                         f"this run's rows are in {side}")
    if drift:
        log.warning("--merge: the original's ppl is %.6f here, %.6f recorded (relative %.1e)", original.ppl,
                    prev["original"]["ppl"], drift)
    merged = {**prev["peers"], **records}
    order = {k: i for i, k in enumerate(PEER_KEYS)}
    merged = dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))))
    return merged, {**prev.get("versions", {}), **versions}, f"{prev['command']}`, then `{cmd} --merge"


def _flags(a, selected: list[str]) -> str:
    """The command-line flags that differ from the defaults, for the recorded command."""
    flags = []
    if a.quick:
        flags.append("--quick")
    elif a.samples != 128:
        flags.append(f"--samples {a.samples}")
    if a.bits != 4:
        flags.append(f"--bits {a.bits}")
    if set(selected) != set(PEER_KEYS):
        flags.append(f"--peers {','.join(selected)}")
    if a.autoround_iters is not None and not a.quick:
        flags.append(f"--autoround-iters {a.autoround_iters}")
    if a.jobs != 1:
        flags.append(f"--jobs {a.jobs}")
    if a.threads != max(1, (os.cpu_count() or 1) // a.jobs):
        flags.append(f"--threads {a.threads}")
    if a.timeout != 60:
        flags.append(f"--timeout {a.timeout:g}")
    if a.autoround_timeout:
        flags.append(f"--autoround-timeout {a.autoround_timeout:g}")
    if a.eval_threads:
        flags.append(f"--eval-threads {a.eval_threads}")
    return "".join(f" {f}" for f in flags)


def float_logit_check(model, calib: Path, out: Path, cache: dict) -> dict | None:
    """Max |log-prob difference| between the runner's float model and ours on the same window: a peer
    whose transformers reads the model differently (rope, tokenizer, dtype) shows up here."""
    import torch
    from safetensors.torch import load_file

    f = out / "float-logprobs.safetensors"
    if not f.is_file():
        return None
    theirs = load_file(str(f))["logprobs"]
    n = theirs.shape[0]
    if n not in cache:
        ids = load_file(str(calib))["input_ids"][:1, :n]
        with torch.no_grad():
            cache[n] = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    return {"tokens": n, "max_abs_logprob_diff": float((theirs - cache[n]).abs().max())}


def _fmt_time(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


PEER_BY_KEY = {p.key: p for p in PEERS}


def _is_symmetric(key: str, r: dict) -> bool:
    """The grid a row used: the runner's own report, else what its peer entry asks for."""
    res = r.get("runner") or {}
    if "symmetric" in res:
        return bool(res["symmetric"])
    peer = PEER_BY_KEY.get(key)
    return peer.symmetric if peer else True


def _calibration(key: str, r: dict, a) -> str:
    """Which calibration a row read: none (data-free) or sequences x tokens of the shared ids."""
    peer = PEER_BY_KEY.get(key)
    if peer is not None and not peer.calibrated:
        return "none"
    res = r.get("runner") or {}
    cal = res.get("calibration_used") or res.get("calibration") or {"num_samples": a.samples, "seq_len": 512}
    return f"{cal['num_samples']} x {cal['seq_len']}"


def _rows(records: dict, ref, a) -> tuple[list[str], list[list[str]]]:
    headers = ["library", "method", "grid", "calibration", "bits", "group", "linear MB", "ppl", "KL (nats/tok)",
               "top-1", "quantize / total", "peak RAM", "note"]
    rows = [["original", "float32 (dequantized Q4_1 GGUF)", "", "", "32", "", "", f"{ref.ppl:.3f}", "", "", "", "",
             ""]]
    for key, r in records.items():
        res = r.get("runner", {})
        method = PEER_BY_KEY[key].method if key in PEER_BY_KEY else r["method"]
        head = [r["library"], method, "sym" if _is_symmetric(key, r) else "asym", _calibration(key, r, a),
                str(a.bits), str(a.group)]
        if "error" in r:
            rows.append(head + ["", "", "", "", "", "", r["error"]])
            continue
        e = r["eval"]
        rows.append(head + [f"{r['bytes'] / 1e6:.2f}", f"{e['ppl']:.3f}", f"{e['kl']:.4f}", f"{100 * e['top1']:.1f}%",
                            f"{_fmt_time(res.get('quant_seconds'))} / {_fmt_time(r.get('wall_seconds'))}",
                            f"{r['peak_rss_kb'] / 1e6:.2f} GB", "; ".join(_row_notes(r))])
    return headers, rows


def _row_notes(r: dict) -> list[str]:
    res = r.get("runner", {})
    note = []
    if r["bytes_source"] == "computed":
        note.append(f"bytes of {res['bytes_from']}" if res.get("bytes_from") else "bytes computed (no saved format)")
    if res.get("iters") is not None:
        note.append(f"iters={res['iters']}")
    if r.get("grid", {}).get("added_head_bytes"):
        note.append(f"head untied by the rotation: +{r['grid']['added_head_bytes'] / 1e6:.1f} MB at fp16")
    return note


def _best_text(records: dict, ref, a) -> str:
    """Per grid kind (symmetric, asymmetric): frugal's best row against the best peer row, by perplexity,
    with the ratio of their gaps to the float model."""
    out = []
    for sym in (True, False):
        done = {k: r for k, r in records.items() if "error" not in r and _is_symmetric(k, r) == sym}
        ours = {k: r for k, r in done.items() if r["library"] == "frugal"}
        theirs = {k: r for k, r in done.items() if r["library"] != "frugal"}
        if not ours or not theirs:
            continue
        fk = min(ours, key=lambda k: ours[k]["eval"]["ppl"])
        pk = min(theirs, key=lambda k: theirs[k]["eval"]["ppl"])
        fp, pp = ours[fk]["eval"]["ppl"], theirs[pk]["eval"]["ppl"]
        cal = _calibration(pk, theirs[pk], a)
        out.append(f"{'symmetric' if sym else 'asymmetric'} grids: frugal's best `{fk}` {fp:.3f} (gap to float "
                   f"{fp - ref.ppl:.2f}) against the best peer `{pk}` ({theirs[pk]['library']}, "
                   f"{'data-free' if cal == 'none' else cal + ' calibration'}) {pp:.3f} (gap {pp - ref.ppl:.2f}): "
                   f"{(fp - ref.ppl) / (pp - ref.ppl):.2f} of it")
    if not out:
        return ""
    return ("\nBest per grid kind (lowest perplexity among the rows that finished, each side compared only with "
            "rows on the same kind of grid): " + "; ".join(out) + ".\n")


def _checks_text(r: dict) -> str:
    out = []
    g = r.get("grid")
    if g and g.get("ok"):
        out.append(f"at most {g['max_distinct_per_group']} distinct values per group in all {g['linears']} linears, "
                   f"{100 * g['moved_fraction']:.1f}% of their weights changed")
        if g.get("changed_by_transform"):
            out.append(f"{g['changed_by_transform']} other tensors changed by the recipe's function-preserving "
                       "transform (folded AWQ scales, rotated norms/embeddings)")
    nc = (r.get("runner") or {}).get("native_check") or {}
    if "max_abs_logprob_diff" in nc:
        out.append(f"the library's own quantized model vs the float32 copy on {nc['tokens']} tokens: max |d log p| "
                   f"{nc['max_abs_logprob_diff']:.2g}, top-1 agreement {100 * nc['top1_agreement']:.1f}%")
    elif nc.get("error"):
        out.append(f"own-model check failed ({nc['error']})")
    fc = r.get("float_check")
    if fc:
        out.append(f"its float model vs frugal's: max |d log p| {fc['max_abs_logprob_diff']:.2g}")
    return (" Checks: " + "; ".join(out) + ".") if out else ""


def _markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _intro_text(a, ref) -> str:
    """The first paragraph of the doc section: what was quantized, how, and what the columns mean."""
    return (
        f"The default model (SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF to float32) quantized to "
        f"W{a.bits}, groups of {a.group} inputs, decoder linear layers only (lm_head/embeddings float), by frugal "
        f"and by each peer library in its own virtualenv (bench/.venvs/, torch 2.13.0 CPU). `grid`: `sym` is a "
        f"scale per group (codes symmetric around 0), `asym` a scale and a zero point per group. `calibration`: "
        f"`none` for data-free methods; calibrated methods all read the same {a.samples} x 512 token ids "
        f"(`frugal.calibrate.from_text` on wikitext-2 `valid.txt`, seed 0), or the first N of them where the "
        f"column says N x 512 (a setting that finishes on this CPU, named in the method). Each library's "
        f"quantized weights are dequantized to float32 and evaluated here with frugal's protocol "
        f"(docs/evaluation.md) against the original on the same {ref.tokens + a.windows} tokens of wikitext-2-raw "
        f"test ({a.windows} windows of 512). Every output was checked to have at most {2 ** a.bits} distinct "
        f"values in every group of {a.group} and the other tensors unchanged (except where a frugal recipe "
        f"transforms the model: AWQ folds its scales into the preceding norm or linear, the rotation rotates "
        f"embeddings and head).\n\n")


def _columns_text(records, a, total_seconds) -> str:
    import torch

    reused = any(r.get("reused") for r in records.values())
    return (
        "`linear MB`: the quantized decoder linears (codes, scales, zero points, g_idx) as stored in the "
        "library's own saved checkpoint (for NNCF the constants of its OpenVINO IR), or, where it saves none, "
        "computed as packed codes + fp16 scales (+ fp16 zero points). `quantize`: the library's quantization "
        "call; `total`: the whole runner process (imports, loading, quantization, saving, dequantization, "
        "checks); `peak RAM`: the runner process's peak RSS. Shared 2-core CPU machine (other jobs may have "
        f"been running), {a.jobs} runner(s) at a time with {a.threads} torch thread(s) each, evaluation with "
        f"{torch.get_num_threads()}; "
        + (f"whole run {total_seconds / 60:.0f} min.\n\n" if not reused else
           f"the runners' outputs were reused from an earlier run of the same command (--reuse), this one took "
           f"{total_seconds / 60:.0f} min.\n\n"))


def _doc_body(records, headers, rows, versions, a, ref, total_seconds) -> str:
    parts = [
        _intro_text(a, ref),
        _columns_text(records, a, total_seconds),
        _markdown(headers, rows),
        _best_text(records, ref, a),
        "\nWhat each library was asked for, its defaults, and the checks of its output:\n\n",
    ]
    for key, r in records.items():
        res = r.get("runner", {})
        ver = res.get("versions") or versions.get(r.get("venv") or "project venv", {})
        vtxt = ", ".join(f"{k} {v}" for k, v in ver.items())
        notes = " ".join(n.rstrip(".") + "." for n in res.get("notes", []))
        status = f" **Failed:** {r['error']}." if "error" in r else ""
        parts.append(f"- **{key}** ({vtxt}): {notes}{status}{_checks_text(r)}\n")
    return "".join(parts)


if __name__ == "__main__":
    main()
