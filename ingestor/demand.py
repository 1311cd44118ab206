"""What the leader streams: the static symbols plus what edges want, within the on-demand globs.

`DemandPolicy` decides, sans I/O, from the union of demand seen at a time; `DemandWatcher`
polls the store and tells the app when the answer changes; `StatusReporter` passes the
upstream's verdict per symbol on to edges (fx:symstatus and a `symbol_status` event).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from typing import NoReturn

from redis.exceptions import RedisError

from shared.bus import Bus
from shared.demand import Catalog, DemandStore, SymbolStatus, symbol_status_event

log = logging.getLogger("fxproxy.ingestor.demand")

POLL_INTERVAL = 0.25  # seconds between demand reads: a new symbol is asked upstream within this
CATALOG_INTERVAL = 2.0  # seconds between catalogue writes: a Redis that lost it has it back soon
STORE_ERRORS = (RedisError, OSError, TimeoutError)


class DemandPolicy:
    """The symbols to stream, given the demand seen at `now`: the static ones first (always on),
    then on-demand ones in the order they were first wanted, each kept until `grace` seconds
    after the first look that found nobody wanting it. Symbols outside the catalogue are ignored."""

    def __init__(self, static: Sequence[str], globs: Sequence[str], grace: float) -> None:
        self.catalog = Catalog(tuple(dict.fromkeys(static)), tuple(globs))
        self._grace = grace
        self._streamed: dict[str, float | None] = {}  # on-demand symbol -> since when unwanted

    def update(self, demand: Collection[str], now: float) -> tuple[str, ...]:
        static = self.catalog.static
        for symbol in demand:
            if symbol not in static and self.catalog.on_demand_allows(symbol):
                self._streamed[symbol] = None  # an existing key keeps its place: first-wanted order
        for symbol, unwanted in list(self._streamed.items()):
            if symbol in demand:
                continue
            if unwanted is None:
                self._streamed[symbol] = unwanted = now
            if now - unwanted >= self._grace:
                del self._streamed[symbol]
        return static + tuple(self._streamed)


OnChange = Callable[[tuple[str, ...]], None]


class DemandWatcher:
    """Polls demand every POLL_INTERVAL and calls `on_change(wanted)` when the set to stream
    changes (and once at the start). Writes the catalogue first and every CATALOG_INTERVAL (Redis
    may lose it), so edges know what may be asked for; clears the status of symbols it drops, so
    a later subscriber is tried afresh."""

    def __init__(self, store: DemandStore, static: Sequence[str], globs: Sequence[str], grace: float,
                 on_change: OnChange, interval: float = POLL_INTERVAL) -> None:
        self._store = store
        self._policy = DemandPolicy(static, globs, grace)
        self._on_change = on_change
        self._interval = interval
        self.wanted: tuple[str, ...] | None = None

    async def run(self) -> NoReturn:
        loop = asyncio.get_running_loop()
        catalog_due = loop.time()
        failing = False
        while True:
            started = loop.time()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that meets
                # the call's completion (the memory store answers at once), and this loop would
                # outlive its term.
                async with asyncio.timeout(1.0):
                    if started >= catalog_due:
                        await self._store.write_catalog(self._policy.catalog)
                        catalog_due = started + CATALOG_INTERVAL
                    demand = await self._store.union()
            except STORE_ERRORS as exc:
                if not failing:
                    log.warning("reading demand failed: streaming the last set",
                                extra={"error": f"{type(exc).__name__}: {exc}"})
                    failing = True
                if self.wanted is None:  # nothing streams yet: the static symbols at least
                    self._apply(self._policy.update((), started))
            else:
                failing = False
                await self._apply_and_clear(self._policy.update(demand, started))
            await asyncio.sleep(max(0.0, started + self._interval - loop.time()))

    def _apply(self, wanted: tuple[str, ...]) -> list[str]:
        """Tell the app about a changed set; the symbols dropped from it."""
        before = self.wanted
        if wanted == before:
            return []
        self.wanted = wanted
        dropped = [s for s in before or () if s not in wanted]
        added = [s for s in wanted if s not in (before or ())]
        log.info("upstream symbols changed", extra={"symbols": len(wanted), "added": added,
                                                    "dropped": dropped})
        self._on_change(wanted)
        return dropped

    async def _apply_and_clear(self, wanted: tuple[str, ...]) -> None:
        dropped = self._apply(wanted)
        if dropped:
            try:
                async with asyncio.timeout(1.0):
                    await self._store.clear_status(dropped)
            except STORE_ERRORS as exc:
                log.warning("clearing symbol status failed", extra={"error": str(exc)})


class StatusReporter:
    """What the upstream's `on_status(symbol, status)` calls: in order, each verdict is written to
    fx:symstatus (for edges that ask later) and then announced on fx:ctl (for clients waiting)."""

    def __init__(self, store: DemandStore, bus: Bus) -> None:
        self._store = store
        self._bus = bus
        self._queue: asyncio.Queue[tuple[str, SymbolStatus]] = asyncio.Queue()

    def report(self, symbol: str, status: SymbolStatus) -> None:
        self._queue.put_nowait((symbol, status))

    async def run(self) -> NoReturn:
        while True:
            symbol, status = await self._queue.get()
            if status != "streaming":
                log.warning("upstream refused a symbol", extra={"symbol": symbol, "status": status})
            try:
                await self._store.set_status(symbol, status)
                await self._bus.publish_control(symbol_status_event(symbol, status))
            except STORE_ERRORS as exc:
                log.warning("symbol status not published", extra={"symbol": symbol, "status": status,
                                                                    "error": str(exc)})
