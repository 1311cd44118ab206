"""Prometheus' `promtool` for the monitoring tests: Debian's `prometheus` package, installed when
missing (tests/support/debian.py; its service is never started)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .debian import find_or_install

__all__ = ["find_promtool", "run_promtool"]


def find_promtool() -> str:
    return find_or_install(["promtool"], ["/usr/bin/promtool", "/usr/local/bin/promtool"], ["prometheus"],
                           "tests/integration/test_monitoring.py")


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `promtool ARGS...` (offline, 60 s at most) and return what it did; never raises on failure."""
    return subprocess.run([find_promtool(), *args], capture_output=True, text=True, check=False,
                          timeout=60, cwd=cwd)
