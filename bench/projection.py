"""Projected compression time (`frugal info --project`) against a measured run, and the projections of
7B and 70B configurations on this machine.

    .venv/bin/python bench/projection.py

The default model: GPTQ W4 g64 on 32 x 512 calibration tokens, measured (frugal.compress, the engine's
stage times; load and save excluded) and projected (compression.projection.project: one block measured on
1 and 3 random sequences, fitted, scaled) in the same run, projection first. Then the projections alone
for the architecture-only configs in bench/configs (Qwen2.5-7B, Llama-3-70B) with GPTQ W4 g128 on
128 x 512 tokens, and their pre-flight memory (in memory and streamed). Rewrites the section `projection`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
log = logging.getLogger("projection")


def _recipe(group: int, samples: int):
    from frugal.config import Recipe

    return Recipe.from_dict({"method": "gptq", "weights": {"bits": 4, "group_size": group},
                             "calibration": {"num_samples": samples, "seq_len": 512}})


def measured_default(recipe) -> tuple[dict[str, float], Path]:
    """Stage seconds of GPTQ on the default model (its own calibration text), and its directory."""
    import frugal
    from frugal.calibrate import from_text
    from frugal.load.model import load_model, shared_dir

    loaded = load_model(None)
    ids = from_text(loaded.tokenizer, shared_dir() / "data" / "wikitext-2" / "valid.txt",
                    recipe.calibration.num_samples, 512, 0)
    c = frugal.compress(loaded.model, recipe, ids, inplace=True)
    return {s: t for s, t in c.report.stages.items() if s != "outside layers"}, Path(loaded.path)


def preflight(config, recipe) -> tuple[int, int, int]:
    """(float32 bytes, in-memory peak, streamed peak) of the pre-flight estimate from meta tensors."""
    from frugal.compression.preflight import estimate_model
    from frugal.compression.projection import meta_model

    est = estimate_model(meta_model(config), recipe)
    return est.model_bytes, est.in_memory_ram_bytes, est.peak_ram_bytes


def main() -> None:
    from frugal.compression.projection import load_config, project

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="qwen2.5-7b,llama-3-70b", help="bench/configs/<name>.json to project")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    small = _recipe(64, 32)
    from frugal.load.model import model_directory

    directory = model_directory(None)[1]
    proj = project(load_config(directory), small)
    real, _ = measured_default(small)
    rows = [["default model (SmolLM2-135M), measured", "gptq W4 g64, 32 x 512", _stages(real), f"{sum(real.values()) / 60:.1f}",
             "", "", ""],
            ["default model, projected", "gptq W4 g64, 32 x 512", _stages(proj.stage_seconds()),
             f"{proj.seconds / 60:.1f}", f"{proj.seconds / sum(real.values()):.2f}x measured", "", ""]]
    big = _recipe(128, 128)
    for name in [n for n in a.configs.split(",") if n]:
        cfg = load_config(CONFIGS / f"{name}.json")
        p = project(cfg, big)
        fp32, mem, stream = preflight(cfg, big)
        width = "" if p.narrowed == 1 else f" (block measured at 1/{p.narrowed} width)"
        rows.append([f"{name}, projected{width}", "gptq W4 g128, 128 x 512", _stages(p.stage_seconds()),
                     f"{p.seconds / 60:.0f}", "", f"{fp32 / 1e9:.1f} GB", f"{mem / 1e9:.1f} / {stream / 1e9:.1f} GB"])
        log.info("%s: %.0f min", name, p.seconds / 60)
    body = render(rows, time.perf_counter() - t0)
    publish("projection", "Projected compression time", "bench/projection.py", sys.argv[1:], body, docs=not a.no_docs)


def _stages(times: dict[str, float]) -> str:
    return ", ".join(f"{s} {t / 60:.1f}" for s, t in times.items() if t >= 0.05 * 60)


def render(rows: list, seconds: float) -> str:
    head = ("Stage minutes (stages under 0.05 min left out); the engine's blocks only: loading, saving and the "
            "layers outside the blocks are not in either figure. Memory: the pre-flight estimate from the "
            f"configuration's meta tensors (in memory / streamed). Whole run {seconds / 60:.1f} min.\n\n")
    lines = ["| model | recipe | stages (min) | total min | projection / measured | float32 | peak RAM |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
