"""The ingestor's upstream side in tests: a recorder of quotes and statuses, a pool running in
the background, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Collection, Sequence

import pytest

from ingestor import pool as pool_module
from ingestor.pool import UpstreamPool
from ingestor.vendors.base import Hooks
from shared.settings import IngestorSettings
from shared.tick import Quote
from tests.support.running import running


class Recorder:
    def __init__(self) -> None:
        self.quotes: list[tuple[float, Quote]] = []
        self.statuses: list[tuple[str, str]] = []

    def quote(self, quote: Quote) -> None:
        self.quotes.append((time.monotonic(), quote))

    def status(self, symbol: str, status: str) -> None:
        self.statuses.append((symbol, status))

    def seen(self, since: float) -> set[str]:
        return {q.symbol for t, q in self.quotes if t >= since}

    def longest_pause(self, symbols: set[str], start: float, end: float) -> float:
        times = [start] + [t for t, q in self.quotes if q.symbol in symbols and start <= t <= end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))


async def eventually(pred: object, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not pred():  # type: ignore[operator]
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def pool_running(settings: IngestorSettings, rec: Recorder) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(settings, rec.quote, rec.status)
    pool.want(settings.symbols)
    async with running(pool.run()):
        yield pool


class FakeSession:
    """Records what the pool hands it; the test plays the vendor through its hooks."""

    def __init__(self, slot: int, symbols: Collection[str], hooks: Hooks) -> None:
        self.slot, self._symbols, self.hooks = slot, frozenset(symbols), hooks
        self.order = list(symbols)  # the priority order it was given
        self.up = False
        self.changes: list[frozenset[str]] = []
        self.closed = False
        self.failing = asyncio.Event()

    @property
    def symbols(self) -> frozenset[str]:
        return self._symbols

    def change(self, symbols: Sequence[str]) -> None:
        self.order = list(symbols)
        self._symbols = frozenset(symbols)
        self.changes.append(self._symbols)

    def login(self) -> None:
        self.up = True
        self.hooks.on_link()

    async def run(self) -> None:
        try:
            await self.failing.wait()
            raise KeyError("a bug in the driver")
        finally:
            self.closed = True

    def fail(self) -> None:
        """End run() with an error the driver did not expect."""
        self.failing.set()


def fake_sessions(monkeypatch: pytest.MonkeyPatch) -> list[FakeSession]:
    """Make the pool open FakeSessions; the list of those it opened, in order."""
    opened: list[FakeSession] = []

    def fake(settings: IngestorSettings, slot: int, symbols: Collection[str], hooks: Hooks) -> FakeSession:
        opened.append(FakeSession(slot, symbols, hooks))
        return opened[-1]

    monkeypatch.setattr(pool_module, "open_session", fake)
    return opened


def settings(static: str, per: int, conns: int, **kw: object) -> IngestorSettings:
    """A forex pool's settings: `per` symbols on each of `conns` sessions."""
    return IngestorSettings(symbols=static, upstream_urls="ws://127.0.0.1:1/",  # type: ignore[arg-type]
                            upstream_max_symbols=per, upstream_max_connections=conns, **kw)  # type: ignore[arg-type]


async def settle() -> None:
    """Let the pool and its sessions run what is ready."""
    for _ in range(5):
        await asyncio.sleep(0)
