"""Fixtures of the chaos tests: a persistent (AOF) redis-server, and a way to print each
scenario's measured summary line even when pytest captures output."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.redis_server import RedisServer


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
