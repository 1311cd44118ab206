"""Attack tests: real processes, a well-behaved neighbour, and a number for every bound."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers only `integration`; `slow` marks the one long attack (30 s stall).
    config.addinivalue_line("markers", "slow: takes well over 20 s (deselect with -m 'not slow')")
