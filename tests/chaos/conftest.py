"""Fixtures of the chaos tests: a persistent (AOF) redis-server, the `slow` marker, and a way to
print each scenario's measured summary line even when pytest captures output."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.redis_server import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    if not any(str(line).startswith("slow:") for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: a chaos scenario that takes more than ~15 s")
    config.addinivalue_line("markers", "chaos: kills, freezes and restarts real processes under witnesses")


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own with AOF (appendfsync everysec), as shipped; its data
    dir survives stop()/start()."""
    server = RedisServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a line to the terminal, past pytest's capture (the measured summary of a scenario)."""

    def out(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}", flush=True)

    return out
