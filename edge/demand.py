"""This edge's side of symbols on demand: publishing what its clients want, and judging a
subscription to a symbol that has no tick yet (pending, or refused with which error)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import NoReturn

from redis.exceptions import RedisError

from edge.protocol import ErrorCode
from shared.demand import Catalog, DemandStore, SymbolStatus

log = logging.getLogger("fxproxy.edge.demand")

DEBOUNCE = 0.05  # seconds: a burst of subscribes is published as one set
CATALOG_TTL = 1.0  # seconds a read catalogue is trusted: one read a second at most, however asked
STORE_ERRORS = (RedisError, OSError, TimeoutError)

Refusal = tuple[ErrorCode, str]
NOT_IN_CATALOG: Refusal = (ErrorCode.UNKNOWN_SYMBOL, "no such symbol on this feed")
REFUSALS: dict[SymbolStatus, Refusal] = {
    "capacity": (ErrorCode.CAPACITY, "over the upstream's symbol limits; try again later"),
    "unknown": (ErrorCode.UNKNOWN_SYMBOL, "the vendor does not carry this symbol"),
}


def judge(symbols: Collection[str], catalog: Catalog | None,
          statuses: dict[str, SymbolStatus]) -> dict[str, Refusal | None]:
    """For symbols with no tick anywhere yet: None (pending: the catalogue allows it and the
    upstream has not refused it), or why it is refused. No catalogue: nothing is on demand."""
    out: dict[str, Refusal | None] = {}
    for symbol in symbols:
        if catalog is None or not catalog.allows(symbol):
            out[symbol] = NOT_IN_CATALOG
        else:
            status = statuses.get(symbol)
            out[symbol] = REFUSALS.get(status) if status is not None else None
    return out


class EdgeDemand:
    """Publishes the hub's symbol set as this edge's demand, DEBOUNCE after it changes and with
    every heartbeat (which refreshes its TTL); reads the catalogue and statuses for subscribes."""

    def __init__(self, store: DemandStore, edge_id: str, symbols: Callable[[], Collection[str]],
                 ttl: float) -> None:
        self.store = store
        self._edge_id = edge_id
        self._symbols = symbols
        self._ttl = ttl
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()  # one write at a time, each of the set as it is then
        self._published: frozenset[str] | None = None
        self._catalog: Catalog | None = None
        self._catalog_at: float | None = None

    def changed(self) -> None:
        """The hub's symbols may have changed (called on every acquire and release)."""
        self._changed.set()

    async def run(self) -> NoReturn:
        while True:
            await self._changed.wait()
            await asyncio.sleep(DEBOUNCE)
            self._changed.clear()
            if frozenset(self._symbols()) != self._published:
                try:
                    await self.publish()
                except STORE_ERRORS as exc:  # the next heartbeat publishes it again
                    log.warning("publishing demand failed", extra={"error": str(exc)})

    async def publish(self) -> None:
        async with self._lock:
            symbols = frozenset(self._symbols())
            await self.store.publish(self._edge_id, symbols, self._ttl)
            self._published = symbols

    async def withdraw(self) -> None:
        async with self._lock:
            await self.store.withdraw(self._edge_id)
            self._published = frozenset()

    async def judge(self, symbols: Collection[str]) -> dict[str, Refusal | None]:
        """judge() with the catalogue (cached CATALOG_TTL) and the statuses of those it allows."""
        now = asyncio.get_running_loop().time()
        if self._catalog is None or self._catalog_at is None or now - self._catalog_at > CATALOG_TTL:
            # None (no leader has written one yet) is not kept: the first one is used at once.
            self._catalog = await self.store.catalog()
            self._catalog_at = now
        catalog = self._catalog
        allowed = [s for s in symbols if catalog is not None and catalog.allows(s)]
        statuses = await self.store.statuses(allowed) if allowed else {}
        return judge(symbols, catalog, statuses)
