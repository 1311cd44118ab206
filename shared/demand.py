"""Symbols on demand: what edges want, what clients may call up, and how the upstream answered.

Each edge keeps the set of its clients' symbols in `fx:demand:{edge_id}`, with the TTL of its
heartbeat, so a dead edge's demand expires; the leading ingestor reads the union over edges
whose heartbeat in `fx:edges` is live. The leader publishes the catalogue (`fx:catalog`: the
static symbols and the on-demand globs), so an edge tells a symbol not streamed yet ("pending")
from one nobody may call up ("unknown_symbol"), and the upstream's verdict per symbol
(`fx:symstatus`, plus a `symbol_status` event on fx:ctl).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal, Protocol, cast, get_args

import orjson

from shared.names import Names
from shared.redis_url import AnyRedis

SymbolStatus = Literal["streaming", "capacity", "unknown"]
STATUSES: frozenset[str] = frozenset(get_args(SymbolStatus))


@dataclass(slots=True, frozen=True)
class Catalog:
    """The symbols clients may subscribe to: the static list, and any matching an on-demand glob."""

    static: tuple[str, ...] = ()
    on_demand: tuple[str, ...] = ()  # fnmatch globs, case-sensitive like key globs

    def on_demand_allows(self, symbol: str) -> bool:
        return any(fnmatchcase(symbol, glob) for glob in self.on_demand)

    def allows(self, symbol: str) -> bool:
        return symbol in self.static or self.on_demand_allows(symbol)

    def encode(self) -> bytes:
        return orjson.dumps({"static": list(self.static), "on_demand": list(self.on_demand)})

    @classmethod
    def decode(cls, raw: bytes) -> Catalog | None:
        """The catalogue stored in `raw`; None when it is not one (edited by hand, another version)."""
        try:
            obj = orjson.loads(raw)
            static, globs = obj["static"], obj["on_demand"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in (static, globs)):
            return None
        return cls(tuple(static), tuple(globs))


def symbol_status_event(symbol: str, status: SymbolStatus) -> bytes:
    return orjson.dumps({"type": "symbol_status", "symbol": symbol, "status": status})


def parse_symbol_status(event: Any) -> tuple[str, SymbolStatus] | None:
    """(symbol, status) of a decoded `symbol_status` control event, else None."""
    if not isinstance(event, dict) or event.get("type") != "symbol_status":
        return None
    symbol, status = event.get("symbol"), event.get("status")
    if not isinstance(symbol, str) or status not in STATUSES:
        return None
    return symbol, cast(SymbolStatus, status)


class DemandStore(Protocol):
    async def publish(self, edge_id: str, symbols: Collection[str], ttl: float) -> None:
        """Replace this edge's wanted set; it expires after `ttl` seconds unless published again."""
        ...

    async def withdraw(self, edge_id: str) -> None: ...

    async def union(self) -> set[str]:
        """Every symbol some live edge wants."""
        ...

    async def write_catalog(self, catalog: Catalog) -> None: ...

    async def catalog(self) -> Catalog | None: ...

    async def set_status(self, symbol: str, status: SymbolStatus) -> None: ...

    async def clear_status(self, symbols: Collection[str]) -> None: ...

    async def reset_statuses(self) -> None:
        """Forget every verdict: a new leader's upstream gives its own."""
        ...

    async def statuses(self, symbols: Collection[str]) -> dict[str, SymbolStatus]: ...


class MemoryDemandStore:
    """One process's demand (`fxproxy demo`, fast tests): every edge sharing it counts as alive."""

    def __init__(self) -> None:
        self.wanted: dict[str, frozenset[str]] = {}
        self.stored_catalog: Catalog | None = None
        self.status: dict[str, SymbolStatus] = {}

    async def publish(self, edge_id: str, symbols: Collection[str], ttl: float) -> None:
        self.wanted[edge_id] = frozenset(symbols)

    async def withdraw(self, edge_id: str) -> None:
        self.wanted.pop(edge_id, None)

    async def union(self) -> set[str]:
        return set().union(*self.wanted.values())

    async def write_catalog(self, catalog: Catalog) -> None:
        self.stored_catalog = catalog

    async def catalog(self) -> Catalog | None:
        return self.stored_catalog

    async def set_status(self, symbol: str, status: SymbolStatus) -> None:
        self.status[symbol] = status

    async def clear_status(self, symbols: Collection[str]) -> None:
        for symbol in symbols:
            self.status.pop(symbol, None)

    async def reset_statuses(self) -> None:
        self.status.clear()

    async def statuses(self, symbols: Collection[str]) -> dict[str, SymbolStatus]:
        return {s: self.status[s] for s in symbols if s in self.status}


def _statuses(symbols: Iterable[str], raw: Iterable[bytes | None]) -> dict[str, SymbolStatus]:
    out: dict[str, SymbolStatus] = {}
    for symbol, value in zip(symbols, raw, strict=True):
        status = value.decode(errors="replace") if value is not None else None
        if status in STATUSES:
            out[symbol] = cast(SymbolStatus, status)
    return out


class RedisDemandStore:
    def __init__(self, client: AnyRedis, names: Names | None = None) -> None:
        self.client = client
        self.names = names or Names()

    async def publish(self, edge_id: str, symbols: Collection[str], ttl: float) -> None:
        key = self.names.demand(edge_id)
        pipe = self.client.pipeline(transaction=True)  # one key: readers never see it half-written
        pipe.delete(key)
        if symbols:
            pipe.sadd(key, *symbols)
            pipe.pexpire(key, max(1, int(ttl * 1000)))
        await pipe.execute()

    async def withdraw(self, edge_id: str) -> None:
        await self.client.delete(self.names.demand(edge_id))

    async def union(self) -> set[str]:
        live = cast(list[bytes], await self.client.zrangebyscore(self.names.edges, time.time(), "+inf"))
        if not live:
            return set()
        keys = [self.names.demand(edge.decode()) for edge in live]
        members = cast(set[bytes], await self.client.sunion(keys))
        return {m.decode() for m in members}

    async def write_catalog(self, catalog: Catalog) -> None:
        await self.client.set(self.names.catalog, catalog.encode())

    async def catalog(self) -> Catalog | None:
        raw = cast(bytes | None, await self.client.get(self.names.catalog))
        return Catalog.decode(raw) if raw is not None else None

    async def set_status(self, symbol: str, status: SymbolStatus) -> None:
        await self.client.hset(self.names.symbol_status, symbol, status)

    async def clear_status(self, symbols: Collection[str]) -> None:
        if symbols:
            await self.client.hdel(self.names.symbol_status, *symbols)

    async def reset_statuses(self) -> None:
        await self.client.delete(self.names.symbol_status)

    async def statuses(self, symbols: Collection[str]) -> dict[str, SymbolStatus]:
        wanted = list(symbols)
        if not wanted:
            return {}
        raw = cast(list[bytes | None], await self.client.hmget(self.names.symbol_status, wanted))
        return _statuses(wanted, raw)
