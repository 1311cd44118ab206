"""What the leader tells edges about each symbol it is asked for, and in which order.

`StatusBook` (sans I/O) turns the pool's statuses and the term's ticks into verdicts: streaming
since the position of the symbol's first tick this term (so an edge can tell a current snapshot
from an old one), capacity, unknown, or none (not streamed now: dropped, or not quoted yet).
`StatusReporter` writes each one to fx:symstatus and announces it on fx:ctl, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import NoReturn, cast

from redis.exceptions import RedisError

from shared.bus import Bus
from shared.demand import DemandStore, SymbolStatus, Verdict, symbol_status_event
from shared.tick import Position

log = logging.getLogger("fxproxy.ingestor.verdicts")
STORE_ERRORS = (RedisError, OSError, TimeoutError)

Report = Callable[[str, Verdict | None], None]  # None: no verdict any more (cleared)


def honour_cancel() -> None:
    """Raise CancelledError if this task was asked to stop: redis-py (8.2) can swallow a cancel
    that meets a command in flight, and a loop of Redis calls would then outlive its term."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class StatusBook:
    """Verdicts per wanted symbol, each reported once when it changes.

    A refusal (capacity, unknown) comes from the pool; "streaming" only from a tick of the symbol
    numbered this term, carrying its position. A symbol that leaves the wanted set loses its
    verdict, so a later subscriber is tried afresh."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._wanted: frozenset[str] = frozenset()
        self._verdicts: dict[str, Verdict] = {}

    def want(self, symbols: Collection[str]) -> None:
        self._wanted = frozenset(symbols)
        for symbol in [s for s in self._verdicts if s not in self._wanted]:
            del self._verdicts[symbol]
            self._report(symbol, None)

    def pool_status(self, symbol: str, status: str) -> None:
        """The pool's word: a refusal is reported; the vendor accepting a symbol (again) only
        clears a refusal, since "streaming" waits for its first tick."""
        if symbol not in self._wanted:
            return
        current = self._verdicts.get(symbol)
        if status in ("capacity", "unknown"):
            self._set(symbol, Verdict(cast(SymbolStatus, status)))
        elif current is not None and current.refused:
            del self._verdicts[symbol]
            self._report(symbol, None)

    def quoted(self, symbol: str, position: Position) -> None:
        """A tick was numbered (called for every one: a dict lookup when nothing changes)."""
        current = self._verdicts.get(symbol)
        if current is None and symbol in self._wanted:
            self._set(symbol, Verdict("streaming", position))

    def _set(self, symbol: str, verdict: Verdict) -> None:
        if self._verdicts.get(symbol) != verdict:
            self._verdicts[symbol] = verdict
            self._report(symbol, verdict)


class StatusReporter:
    """What the book reports: in order, each verdict is written to fx:symstatus (for edges that
    ask later) and then announced on fx:ctl (for clients of the symbol); a cleared one is
    deleted."""

    def __init__(self, store: DemandStore, bus: Bus) -> None:
        self._store = store
        self._bus = bus
        self._queue: asyncio.Queue[tuple[str, Verdict | None]] = asyncio.Queue()

    def report(self, symbol: str, verdict: Verdict | None) -> None:
        self._queue.put_nowait((symbol, verdict))

    async def flushed(self) -> None:
        """Return once every verdict reported so far is written (or failed to be)."""
        await self._queue.join()

    async def run(self) -> NoReturn:
        while True:
            honour_cancel()
            symbol, verdict = await self._queue.get()
            try:
                if verdict is not None and verdict.refused:
                    log.warning("upstream refused a symbol", extra={"symbol": symbol,
                                                                    "status": verdict.status})
                if verdict is None:
                    await self._store.clear_status([symbol])
                else:
                    await self._store.set_status(symbol, verdict)
                    await self._bus.publish_control(symbol_status_event(symbol, verdict))
            except STORE_ERRORS as exc:
                log.warning("symbol status not published", extra={
                    "symbol": symbol, "status": verdict.status if verdict else None, "error": str(exc)})
            finally:
                self._queue.task_done()
