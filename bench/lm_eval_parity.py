"""Zero-shot PIQA / HellaSwag: frugal.evaluation.tasks against the reference harness lm-eval, same model, same items.

    .venv/bin/python bench/lm_eval_parity.py                  # PIQA first 300 items, HellaSwag first 100
    .venv/bin/python bench/lm_eval_parity.py --limit 20       # both tasks, first 20 items (smoke run)

lm-eval 0.4.13 gets its own virtualenv, bench/.venvs/lm-eval (created here: the local CPU torch wheel
first, then lm-eval with constraints.txt so no CUDA torch is pulled, and the project's transformers
version). lm-eval cannot reach the hub, so the tasks are local copies of its official `piqa` and
`hellaswag` tasks (same doc_to_text / doc_to_choice / doc_to_target; hellaswag's process_docs is the
installed utils.py, copied verbatim) reading JSONL files derived here from ../shared/data by
frugal.evaluation.tasks' doc readers. lm-eval runs on the default model's float32 directory (`--batch_size 1`,
CPU, samples logged); frugal.evaluation.tasks then scores the same items, and every context string,
choice and log-likelihood is compared, not only the accuracies.

Prints a table and rewrites the `lm-eval-parity` section of docs/benchmarks.md. Work files go to
bench/.work/lm-eval-parity/.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from common import write_section  # noqa: E402

VENV = BENCH / ".venvs" / "lm-eval"
WORK = BENCH / ".work" / "lm-eval-parity"
LM_EVAL = "lm-eval==0.4.13"
TORCH = "torch==2.13.0"  # the local CPU wheel; constraints.txt pins it for every later install
DEFAULT_LIMITS = {"piqa": 300, "hellaswag": 100}

log = logging.getLogger("lm_eval_parity")


# ------------------------------------------------------------------------------------------- venv

def _base_python() -> str:
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else Path(sys.base_prefix) / "bin" / "python3")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


def ensure_venv() -> Path:
    """bench/.venvs/lm-eval with lm-eval, the CPU torch and the project's transformers; reused when ready."""
    import transformers

    reqs = [LM_EVAL, f"transformers=={transformers.__version__}", "accelerate", "sentencepiece"]
    stamp = VENV / ".frugal-installed"
    want = json.dumps({"torch": TORCH, "reqs": reqs})
    py = VENV / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == want:
        return py
    WORK.mkdir(parents=True, exist_ok=True)
    logfile = WORK / "install.log"
    steps = [] if py.is_file() else [[_base_python(), "-m", "venv", str(VENV)]]
    steps += [[str(py), "-m", "pip", "install", TORCH],
              [str(py), "-m", "pip", "install", "-c", str(ROOT / "constraints.txt"), *reqs]]
    log.info("installing %s into %s (log %s)", LM_EVAL, VENV, logfile)
    with open(logfile, "w") as f:
        for cmd in steps:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_clean_env()).returncode != 0:
                sys.exit(f"install failed: {' '.join(cmd)} (see {logfile})")
    r = subprocess.run([str(py), "-c", "import torch, lm_eval.api.model; print(torch.__version__)"],
                       capture_output=True, text=True, env=_clean_env())
    if r.returncode != 0 or not r.stdout.startswith("2.13.0"):
        sys.exit(f"{VENV}: torch {r.stdout.strip()!r} / lm_eval import failed: {r.stderr.strip()[-300:]}")
    stamp.write_text(want)
    return py


def venv_versions(py: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d: m.version(d) for d in ('lm_eval', 'torch', 'transformers', 'datasets')}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_clean_env())
    return json.loads(r.stdout) if r.returncode == 0 else {}


# -------------------------------------------------------------------------------------- task files

TASK_YAML = """\
task: frugal_{task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
test_split: null
{prompt}metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# what differs between the two task files: how a document becomes the prompt, target and choices
TASK_PROMPTS = {
    "piqa": """\
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
""",
    "hellaswag": """\
process_docs: !function utils.process_docs
doc_to_text: "{{query}}"
doc_to_target: "{{label}}"
doc_to_choice: "choices"
""",
}


def task_yaml(task: str, data: Path) -> str:
    """lm-eval task file `frugal_<task>` reading its documents from the JSONL file `data`."""
    return TASK_YAML.format(task=task, data=json.dumps(str(data)), prompt=TASK_PROMPTS[task])


def write_tasks(py: Path) -> Path:
    """Task YAMLs and their JSONL data under WORK/tasks; returns the include path."""
    from frugal.evaluation.tasks import hellaswag_docs, piqa_docs

    d = WORK / "tasks"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, docs, fields in (("piqa", piqa_docs(), ("goal", "sol1", "sol2", "label")),
                               ("hellaswag", hellaswag_docs(), ("activity_label", "ctx_a", "ctx_b", "endings", "label"))):
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({k: doc[k] for k in fields}, ensure_ascii=False) + "\n")
        (d / f"frugal_{name}.yaml").write_text(task_yaml(name, d / f"{name}.jsonl"))
    r = subprocess.run([str(py), "-c", "import lm_eval.tasks.hellaswag.utils as u; print(u.__file__)"],
                       capture_output=True, text=True, env=_clean_env())
    if r.returncode != 0:
        sys.exit(f"lm-eval's hellaswag utils not found: {r.stderr.strip()[-300:]}")
    shutil.copy(r.stdout.strip(), d / "utils.py")  # the official preprocess / process_docs, verbatim
    return d


# ------------------------------------------------------------------------------------------ running

def lm_eval_command(py: Path, model_dir: Path, task: str, limit: int, include: Path, out: Path) -> list[str]:
    return [str(py.parent / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
            "--tasks", f"frugal_{task}", "--include_path", str(include), "--limit", str(limit),
            "--batch_size", "1", "--device", "cpu", "--output_path", str(out), "--log_samples"]


def run_lm_eval(py: Path, model_dir: Path, task: str, limit: int, include: Path, threads: int) -> dict:
    """Run lm-eval; returns acc, acc_norm, per-doc samples (context, choices, log-likelihoods), seconds."""
    out = WORK / "out" / f"{task}-{limit}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = _clean_env() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                          "HF_DATASETS_CACHE": str(WORK / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false",
                          "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = lm_eval_command(py, model_dir, task, limit, include, out)
    logfile = WORK / f"lm-eval-{task}-{limit}.log"
    log.info("lm-eval %s (limit %d): log %s", task, limit, logfile)
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"lm-eval failed (exit {rc}); see {logfile}")
    results = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    samples = sorted(glob.glob(str(out / "**" / f"samples_frugal_{task}_*.jsonl"), recursive=True))
    if not results or not samples:
        sys.exit(f"lm-eval wrote no results/samples under {out}")
    res = json.loads(Path(results[-1]).read_text())["results"][f"frugal_{task}"]
    docs = {}
    for line in Path(samples[-1]).read_text().splitlines():
        s = json.loads(line)
        lls = [float(r[0]) for r in s["filtered_resps"]]
        docs[int(s["doc_id"])] = {"pairs": _pairs_from_sample(s["arguments"]), "lls": lls,
                                  "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])}
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "docs": docs, "seconds": seconds,
            "command": cmd}


def _pairs_from_sample(arguments) -> list[tuple[str, str]]:
    """(context, continuation) pairs from a logged sample's `arguments` (dict or list layout)."""
    values = arguments.values() if isinstance(arguments, dict) else arguments
    out = []
    for a in values:
        if isinstance(a, dict):
            out.append((a["arg_0"], a["arg_1"]))
        else:
            out.append((a[0], a[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None,
                    help="items per task (default: PIQA 300, HellaSwag 100), the first ones in file order")
    ap.add_argument("--tasks", default="piqa,hellaswag", help="comma-separated: piqa,hellaswag")
    ap.add_argument("--model", default=None, help="model (default: the default model's float32 directory)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward in frugal.evaluation.tasks")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (default 1: on this shared 2-core machine two threads "
                         "spin-wait and run ~3x slower)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    from frugal.load.model import load_model
    from frugal.evaluation.tasks import load_items, loglikelihoods, predictions, score

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    tasks = [t for t in a.tasks.split(",") if t]
    t_all = time.perf_counter()
    py = ensure_venv()
    versions = venv_versions(py)
    include = write_tasks(py)
    loaded = load_model(a.model)
    model_dir = loaded.path
    rows, details, closest = [], {}, {}
    for task in tasks:
        limit = a.limit or DEFAULT_LIMITS[task]
        ref = run_lm_eval(py, model_dir, task, limit, include, a.threads)
        items = load_items(task, limit)
        t0 = time.perf_counter()
        lls = loglikelihoods(loaded.model, loaded.tokenizer, items, batch_size=a.batch_size, desc=task)
        seconds = time.perf_counter() - t0
        ours = score(items, lls)
        preds = predictions(items, lls)
        # item-by-item: same context and continuation strings, same log-likelihoods, same verdicts
        text_diff, verdict_diff, max_dll, missing = 0, 0, 0.0, 0
        for i, item in enumerate(items):
            doc = ref["docs"].get(i)
            if doc is None:
                missing += 1
                continue
            if doc["pairs"] != [(item.context, c) for c in item.continuations]:
                text_diff += 1
                if text_diff <= 3:
                    log.warning("%s item %d: lm-eval requests %r != frugal %r", task, i, doc["pairs"][:1],
                                [(item.context, item.continuations[0])])
            max_dll = max(max_dll, max(abs(x - y) for x, y in zip(doc["lls"], lls[i])))
            verdict_diff += (doc["acc"], doc["acc_norm"]) != (float(preds[i][0] == item.gold),
                                                              float(preds[i][1] == item.gold))
        equal = ours["acc"] == ref["acc"] and ours["acc_norm"] == ref["acc_norm"]
        margins = []  # relative gap between the two best length-normalized scores, per item
        for i, item in enumerate(items):
            norm = sorted((v / len(c) for v, c in zip(lls[i], item.choices)), reverse=True)
            margins.append((abs(norm[0] - norm[1]) / abs(norm[0]), i))
        m, i = min(margins)
        closest[task] = f"{task}: the closest acc_norm call is item {i} (top two normalized scores {m:.1e} apart, relative)"
        rows.append([task, limit, ref["acc"], ours["acc"], ref["acc_norm"], ours["acc_norm"], equal,
                     text_diff, verdict_diff, missing, max_dll, ref["seconds"], seconds])
        details[task] = " ".join(ref["command"]).replace(str(ROOT) + "/", "").replace(str(model_dir), "MODEL_DIR")
    headers = ["task", "limit", "lm-eval acc", "frugal acc", "lm-eval acc_norm", "frugal acc_norm", "equal?",
               "items with other text",
               "items scored otherwise", "items missing", "max |Δ loglik|", "lm-eval s", "frugal s"]

    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.2e}" if v < 0.01 and v != 0 else f"{v:.4f}" if v < 10 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    total = time.perf_counter() - t_all
    print(f"total {total:.0f} s")
    notes = ("Near ties: " + "; ".join(closest.values()) + ". A perturbation of the model larger than "
             "the float32 noise (another precision, other weights) can flip such an item; between lm-eval and "
             "frugal here none flips.")
    print(notes)
    if a.no_docs:
        return
    argv = " ".join(sys.argv[1:])
    command = f".venv/bin/python bench/lm_eval_parity.py{(' ' + argv) if argv else ''}"
    model_name = "the default model's float32 directory (dequantized once from its GGUF)" if a.model is None else f"`{a.model}`"
    body = (f"lm-eval {versions.get('lm_eval', '?')} (torch {versions.get('torch', '?')}, transformers "
            f"{versions.get('transformers', '?')}, datasets {versions.get('datasets', '?')}, its own venv "
            f"bench/.venvs/lm-eval) against `frugal.evaluation.tasks`, zero-shot, on {model_name}, float32, CPU. Both read "
            "the same first N items, in file order, of ../shared/data: lm-eval through local copies of its "
            "official `piqa` and `hellaswag` task configs (same doc_to_text / doc_to_choice / doc_to_target; "
            "hellaswag's process_docs is the installed `utils.py`, copied) over JSONL written from that data by "
            "`frugal.evaluation.tasks.piqa_docs` / `hellaswag_docs`. \"items with other text\": items whose (context, "
            "continuation) request strings differ between the two; \"items scored otherwise\": items whose acc "
            "or acc_norm verdict differs; \"max |Δ loglik|\": the largest difference of one choice's summed "
            f"log-likelihood (frugal batches {a.batch_size} right-padded sequences, lm-eval ran `--batch_size 1`). "
            f"{a.threads} torch thread(s) each, one after the other; total wall time {total / 60:.1f} min "
            "including lm-eval's start-up.\n\n"
            f"{table}\n\n{notes}\n\nlm-eval commands (from the repository root; work dir "
            f"bench/.work/lm-eval-parity/; environment HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
            f"OMP_NUM_THREADS={a.threads}; MODEL_DIR = `{model_dir}`):\n\n"
            + "\n".join(f"- {t}: `{c}`" for t, c in details.items()) + "\n")
    write_section(ROOT / "docs" / "benchmarks.md", "lm-eval-parity", "Zero-shot tasks: frugal against lm-eval",
                  command, body)


if __name__ == "__main__":
    main()
