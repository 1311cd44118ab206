"""What the leader streams: the static symbols plus what edges want, within the on-demand globs.

`DemandPolicy` decides, sans I/O, from the union of demand seen at a time; `DemandWatcher`
polls the store and tells the app when the answer changes, leaving its state in the store for the
next leader (`take_over` reads it back: what the previous leader streamed keeps its place).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import NoReturn

from redis.exceptions import RedisError

from ingestor.verdicts import honour_cancel
from shared.demand import Catalog, DemandStore, Handover

log = logging.getLogger("fxproxy.ingestor.demand")

POLL_INTERVAL = 0.25  # seconds between demand reads: a new symbol is asked upstream within this
CATALOG_INTERVAL = 2.0  # seconds between catalogue writes: a Redis that lost it has it back soon
STORE_ERRORS = (RedisError, OSError, TimeoutError)


class DemandPolicy:
    """The symbols to stream, given the demand seen at `now` (wall-clock seconds): the static ones
    first (always on), then on-demand ones in the order they were first wanted (those first seen
    together, by name), each kept until `grace` seconds after the first look that found nobody
    wanting it. Symbols outside the catalogue are ignored. `seed` is a previous leader's state."""

    def __init__(self, static: Sequence[str], globs: Sequence[str], grace: float,
                 seed: Sequence[tuple[str, float | None]] = ()) -> None:
        self.catalog = Catalog(tuple(dict.fromkeys(static)), tuple(globs))
        self._grace = grace
        self._streamed: dict[str, float | None] = {}  # on-demand symbol -> since when unwanted
        for symbol, unwanted in seed:
            if symbol not in self.catalog.static and self.catalog.on_demand_allows(symbol):
                self._streamed.setdefault(symbol, unwanted)

    def update(self, demand: Collection[str], now: float) -> tuple[str, ...]:
        static = self.catalog.static
        # Sorted: a Redis set's order differs between processes, and it decides who gets the room.
        for symbol in sorted(demand):
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

    def state(self) -> Handover:
        """The on-demand symbols in order, each with since when nobody wants it (None: wanted)."""
        return list(self._streamed.items())


async def take_over(store: DemandStore) -> Handover:
    """A new leader's seed, read before the previous leader's verdicts are cleared: its on-demand
    symbols, those it was streaming first (so clients being sent them keep them when capacity is
    short), then the rest, each in its order and with its grace."""
    handover = await store.handover()
    verdicts = await store.statuses([s for s, _ in handover])
    streamed = [(s, u) for s, u in handover if s in verdicts and not verdicts[s].refused]
    return streamed + [(s, u) for s, u in handover if s not in verdicts or verdicts[s].refused]


OnChange = Callable[[tuple[str, ...]], None]


class DemandWatcher:
    """Polls demand every POLL_INTERVAL and calls `on_change(wanted)` when the set to stream
    changes (and once at the start). Writes the catalogue first and every CATALOG_INTERVAL (Redis
    may lose it), so edges know what may be asked for, and its state for the next leader whenever
    it changes (and with the catalogue)."""

    def __init__(self, store: DemandStore, static: Sequence[str], globs: Sequence[str], grace: float,
                 on_change: OnChange, interval: float = POLL_INTERVAL,
                 seed: Sequence[tuple[str, float | None]] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._policy = DemandPolicy(static, globs, grace, seed)
        self._on_change = on_change
        self._interval = interval
        self._clock = clock
        self.wanted: tuple[str, ...] | None = None
        self._catalog_due = 0.0
        self._handed: Handover | None = None  # the state last written for the next leader
        self._failing = False

    async def run(self) -> NoReturn:
        loop = asyncio.get_running_loop()
        while True:
            honour_cancel()
            started = loop.time()
            await self.poll()
            await asyncio.sleep(max(0.0, started + self._interval - loop.time()))

    async def poll(self) -> None:
        """One look at demand (and the writes that are due)."""
        now = self._clock()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that meets
            # the call's completion (the memory store answers at once), and this loop would
            # outlive its term.
            async with asyncio.timeout(1.0):
                refresh = now >= self._catalog_due
                if refresh:
                    await self._store.write_catalog(self._policy.catalog)
                    self._catalog_due = now + CATALOG_INTERVAL
                demand = await self._store.union()
                self._apply(self._policy.update(demand, now))
                state = self._policy.state()
                if refresh or state != self._handed:
                    await self._store.write_handover(state)
                    self._handed = state
        except STORE_ERRORS as exc:
            if not self._failing:
                log.warning("reading demand failed: streaming the last set",
                            extra={"error": f"{type(exc).__name__}: {exc}"})
                self._failing = True
            if self.wanted is None:  # nothing streams yet: the static symbols at least
                self._apply(self._policy.update((), now))
        else:
            self._failing = False

    def _apply(self, wanted: tuple[str, ...]) -> None:
        """Tell the app about a changed set."""
        before = self.wanted
        if wanted == before:
            return
        self.wanted = wanted
        dropped = [s for s in before or () if s not in wanted]
        added = [s for s in wanted if s not in (before or ())]
        log.info("upstream symbols changed", extra={"symbols": len(wanted), "added": added,
                                                    "dropped": dropped})
        self._on_change(wanted)
