"""Helpers shared by the benchmark scripts: docs/benchmarks.md is made of named sections."""

from __future__ import annotations

import platform
import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery figure below names the command that produced it. Times are wall-clock on a 2-core CPU machine.\n"


def write_section(path: Path, key: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section `key` of a markdown file, keeping the others."""
    text = path.read_text() if path.exists() else HEADER
    block = (f"<!-- section:{key} -->\n## {title}\n\nCommand: `{command}`  \n"
             f"Machine: {platform.machine()}, Python {platform.python_version()}\n\n{body}\n<!-- /section:{key} -->\n")
    pattern = re.compile(rf"<!-- section:{re.escape(key)} -->.*?<!-- /section:{re.escape(key)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def publish(key: str, title: str, script: str, args: list[str], body: str, docs: bool = True) -> None:
    """Print a benchmark's body and (unless `docs` is false) make it docs/benchmarks.md section `key`,
    naming the command `make setup && .venv/bin/python <script> <args>`."""
    print(body)
    if docs:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", key, title,
                      f"make setup && .venv/bin/python {script} " + " ".join(args), body)
