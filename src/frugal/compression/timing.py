"""Wall time per stage of a compression (capture, statistics, solve, re-run, each transform, outside
layers): `with collect() as times:` around a run, `with stage(name):` around a piece of it. Stages
nest by name only (a stage inside another is counted in both); outside `collect` `stage` costs nothing."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Iterator

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("frugal_stage_times", default=None)


@contextlib.contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Collect the stages run inside; yields {stage: seconds}, filled as they end (an enclosing collect
    keeps its own)."""
    times: dict[str, float] = {}
    token = _ACTIVE.set(times)
    try:
        yield times
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the wall time of the body to stage `name` of the active collection (if any)."""
    times = _ACTIVE.get()
    if times is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def describe(times: dict[str, float]) -> str:
    """'capture 1.2 s, statistics 30.1 s, ...' in the order the stages first ran."""
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
