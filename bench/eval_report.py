"""The evaluation suite on the default model: original vs frugal's GPTQ and RTN outputs, side by side.

    .venv/bin/python bench/eval_report.py              # compress (if needed), evaluate, write the report
    .venv/bin/python bench/eval_report.py --quick      # fewer tokens and task items

Writes docs/report/results.json and docs/report/report.html (the example report), and the
`eval-report` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import write_section  # noqa: E402

WORK = ROOT / "bench" / ".work" / "eval_report"
VARIANTS = {  # name -> frugal compress options
    "gptq-w4g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
    "rtn-w4g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
}


def compress_variants(samples: int) -> list[str]:
    """Compress the default model once per variant (kept under bench/.work between runs)."""
    paths = []
    for name, opts in VARIANTS.items():
        out = WORK / f"{name}-n{samples}"
        if not (out / "frugal.json").is_file():
            cmd = [str(ROOT / ".venv/bin/frugal"), "compress", *opts, "--samples", str(samples), "--no-eval",
                   "-o", str(out), "--overwrite"]
            subprocess.run(cmd, check=True)
        paths.append(str(out))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples for the GPTQ variants")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    from frugal.cli.main import eval_table
    from frugal.evaluation.suite import SuiteOptions, run_suite
    from frugal.evaluation.metrics import Protocol
    from frugal.report.html import write_report
    from frugal.load.model import shared_dir

    transformers.logging.set_verbosity_error()
    paths = compress_variants(16 if a.quick else a.samples)
    tokens, piqa, hellaswag = (2048, 50, 20) if a.quick else (8192, 200, 100)
    protocol = Protocol(text=str(shared_dir() / "data/wikitext-2-raw/wiki.test.lf.raw"), seq_len=512, max_tokens=tokens)
    opts = SuiteOptions(protocol=protocol, tasks={"piqa": piqa, "hellaswag": hellaswag}, speed=True, generate=True)
    results = run_suite(paths, "default", opts)
    for m in results["models"]:  # short, machine-independent labels
        m["name"] = "original (float32)" if m["is_reference"] else Path(m["path"]).name.rsplit("-n", 1)[0]
        m["path"] = Path(m["path"]).name
    results["reference"] = "original (float32)"
    text = eval_table(results)
    print(text)
    out = ROOT / "docs" / "report"
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)
    if not a.quick:
        samples = a.samples
        body = (f"Default model and three frugal compressions (calibration {samples} x 512 tokens of wikitext-2 "
                f"valid, seed 0). Perplexity/KL/top-1 on the first {tokens} tokens of wikitext-2-raw test in windows "
                f"of 512; PIQA first {piqa} items and HellaSwag first {hellaswag} items (acc / acc_norm); speed: "
                "128-token prompt, 32 new tokens, median of 5 after 1 warm-up, one process per model. "
                "The full report: [docs/report/report.html](report/report.html).\n\n```\n" + text + "\n```\n")
        write_section(ROOT / "docs" / "benchmarks.md", "eval-report", "Evaluation suite on the default model",
                      ".venv/bin/python bench/eval_report.py", body)


if __name__ == "__main__":
    main()
