"""A line protocol for engines that run in their own virtualenv: the benchmark starts the runner once,
sends one JSON request per line on its stdin and reads one JSON answer per line, so a model is loaded
once and several engines can be measured in turn (alternating) while the others wait idle.

The runner's stdout is kept for the answers only: `channel()` moves file descriptor 1 onto stderr
first, so whatever the engine or its C libraries print goes to the log, never into the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Callable, TextIO


def channel() -> TextIO:
    """A private copy of stdout for the answers; fd 1 (and sys.stdout) then write to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def loop(handlers: dict[str, Callable[..., dict]], out: TextIO, ready: dict | None = None) -> None:
    """Answer requests {"cmd": name, **kwargs} with handlers[name](**kwargs) until "quit" or EOF.

    A handler's exception is answered as {"error": "Type: message"} and the loop goes on."""
    answer(out, {"ready": True, **(ready or {})})
    for line in sys.stdin:
        if not line.strip():
            continue
        req: dict[str, Any] = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            break
        try:
            answer(out, handlers[cmd](**req))
        except Exception as e:  # noqa: BLE001 - reported to the benchmark, which shows it in its table
            traceback.print_exc()
            answer(out, {"error": f"{type(e).__name__}: {e}"[:400]})


def answer(out: TextIO, obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()
