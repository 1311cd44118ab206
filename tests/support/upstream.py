"""The ingestor's upstream side in tests: a recorder of quotes and statuses, a pool or session
running in the background, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from ingestor.pool import UpstreamPool
from ingestor.vendors.supervise import Supervised
from shared.settings import IngestorSettings
from shared.tick import Quote


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
    task = asyncio.create_task(pool.run())
    try:
        yield pool
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def session_running(session: Supervised) -> AsyncIterator[Supervised]:
    task = asyncio.create_task(session.run())
    try:
        yield session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
