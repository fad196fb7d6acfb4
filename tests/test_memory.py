"""Peak memory: the `frugal eval --speed` child reports its own peak (VmHWM), not the peak it inherits
from a parent that holds other models (ru_maxrss survives fork + exec on Linux)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BALLAST = 500 * 10**6


def ballast() -> bytearray:
    """BALLAST bytes, every page touched: resident in this process, not just reserved."""
    b = bytearray(BALLAST)
    b[::4096] = b"\x01" * len(range(0, BALLAST, 4096))
    return b


def resident_bytes() -> int:
    """This process's current resident size (VmRSS)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM needs /proc")
def test_child_peak_excludes_the_parent():
    """The measurement `python -m frugal.evaluation.speed` reports, taken in a child of a parent that
    holds 500 MB: ru_maxrss would say >= the parent's peak, VmHWM says the child's (torch alone)."""
    held = ballast()
    parent = resident_bytes()
    assert parent > BALLAST  # the parent really holds the ballast (ru_maxrss would report >= this)
    code = "from frugal.evaluation.speed import peak_rss_bytes; print(peak_rss_bytes())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = int(proc.stdout.split()[-1])
    assert 10e6 < child < parent - BALLAST // 2, (child, parent)
    del held


def test_peak_is_vmhwm_and_ru_maxrss_only_without_proc(monkeypatch, tmp_path):
    """The shared function reads VmHWM from /proc/self/status, and falls back to ru_maxrss (KiB)."""
    import resource

    from frugal.compression import preflight

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  999999 kB\nVmHWM:\t   12345 kB\nVmRSS:\t   100 kB\n")
    real = preflight.Path

    monkeypatch.setattr(preflight, "Path", lambda p: status if p == "/proc/self/status" else real(p))
    assert preflight.peak_rss_bytes() == 12345 * 1024
    monkeypatch.setattr(preflight, "Path", lambda p: tmp_path / "absent" if p == "/proc/self/status" else real(p))
    assert preflight.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_speed_uses_the_shared_measurement():
    from frugal.compression import preflight
    from frugal.evaluation import speed

    assert speed.peak_rss_bytes is preflight.peak_rss_bytes
