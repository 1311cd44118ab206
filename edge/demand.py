"""This edge's side of symbols on demand: publishing what its clients want, and judging every
subscription against the catalogue and the leader's verdicts: served (snapshot or replay),
pending (no snapshot: the symbol is not streamed now, or what is stored predates this stream),
or refused with which error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Literal, NoReturn

from redis.exceptions import RedisError

from edge.protocol import ErrorCode
from shared.demand import Catalog, DemandStore, SymbolStatus, Verdict
from shared.tick import Position

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


SERVE: Literal["serve"] = "serve"  # as any streamed symbol: its snapshot or replay (pending if none)
PENDING: Literal["pending"] = "pending"  # subscribed, no snapshot: the first tick is the next one
Judgement = Refusal | Literal["serve", "pending"]


def judge(symbols: Mapping[str, Position | None], catalog: Catalog | None,
          verdicts: Mapping[str, Verdict]) -> dict[str, Judgement]:
    """Each symbol (with the newest position this edge or Redis holds) against the catalogue and
    the leader's verdicts. Refused: outside the catalogue, or capacity/unknown. A configured
    symbol is served. An on-demand one is served only while streamed and when what is stored
    belongs to this stream (at or after its first tick this term); otherwise it is pending, and
    an old stored tick is not handed out as if current. No catalogue (no leader yet, or no demand
    store): only what has ticked is served."""
    out: dict[str, Judgement] = {}
    for symbol, newest in symbols.items():
        verdict = verdicts.get(symbol)
        if catalog is None:
            out[symbol] = SERVE if newest is not None else NOT_IN_CATALOG
        elif not catalog.allows(symbol):
            out[symbol] = NOT_IN_CATALOG
        elif verdict is not None and verdict.refused:
            out[symbol] = REFUSALS[verdict.status]
        else:
            current = verdict is not None and newest is not None and _covers(verdict.since, newest)
            out[symbol] = SERVE if symbol in catalog.static or current else PENDING
    return out


def _covers(since: Position | None, newest: Position) -> bool:
    """Whether a stored tick at `newest` is part of the stream that started at `since`."""
    return since is None or (newest.epoch == since.epoch and newest.seq >= since.seq)


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
        self._degraded = False  # the last judge() ran on the cached catalogue alone

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

    async def judge(self, symbols: Mapping[str, Position | None]) -> dict[str, Judgement]:
        """judge() with the catalogue (cached CATALOG_TTL) and the verdicts of those it allows.

        While the store does not answer (its shard failing over), the cached catalogue alone
        judges: configured symbols are served, on-demand ones wait as pending; a refusal still
        reaches them by its event or the next heartbeat's recheck. With nothing cached, it raises.
        """
        try:
            catalog = await self._read_catalog()
            allowed = [s for s in symbols if catalog is not None and catalog.allows(s)]
            statuses = await self.store.statuses(allowed) if allowed else {}
        except STORE_ERRORS as exc:
            if self._catalog is None:
                raise
            if not self._degraded:
                log.warning("demand store unavailable: judging subscribes by the cached catalogue",
                            extra={"error": str(exc)})
            self._degraded = True
            return judge(symbols, self._catalog, {})
        if self._degraded:
            log.info("demand store available again")
            self._degraded = False
        return judge(symbols, catalog, statuses)

    async def _read_catalog(self) -> Catalog | None:
        now = asyncio.get_running_loop().time()
        if self._catalog is None or self._catalog_at is None or now - self._catalog_at > CATALOG_TTL:
            # None (no leader has written one yet) is not kept: the first one is used at once.
            self._catalog = await self.store.catalog()
            self._catalog_at = now
        return self._catalog
