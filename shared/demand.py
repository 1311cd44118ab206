"""Symbols on demand: what edges want, what clients may call up, and how the upstream answered.

Each edge keeps the set of its clients' symbols in `fx:demand:{edge_id}`, with the TTL of its
heartbeat, so a dead edge's demand expires; the leading ingestor reads the union over edges
whose heartbeat in `fx:edges` is live. The leader publishes the catalogue (`fx:catalog`: the
static symbols and the on-demand globs), so an edge tells a symbol not streamed now ("pending")
from one nobody may call up ("unknown_symbol"), and its verdict per symbol (`fx:symstatus`, plus
a `symbol_status` event on fx:ctl): streaming since a position (the first tick of this term),
or refused (capacity, unknown); no verdict means not streamed now. It also leaves its on-demand
set, in priority order with each symbol's grace, in `fx:ondemand` for the next leader.
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
from shared.tick import Position, is_epoch

SymbolStatus = Literal["streaming", "capacity", "unknown"]
STATUSES: frozenset[str] = frozenset(get_args(SymbolStatus))


@dataclass(slots=True, frozen=True)
class Verdict:
    """The leader's word on one symbol. `since` (streaming only) is the position of its first tick
    this term: a stored tick older than that is from an earlier stream, not a current snapshot."""

    status: SymbolStatus
    since: Position | None = None

    @property
    def refused(self) -> bool:
        return self.status != "streaming"

    def encode(self) -> str:
        """'capacity', 'unknown', or 'streaming:EPOCH:SEQ' (epochs are URL-safe base64: no ':')."""
        if self.since is None:
            return self.status
        return f"{self.status}:{self.since.epoch}:{self.since.seq}"

    @classmethod
    def decode(cls, raw: str) -> Verdict | None:
        status, _, rest = raw.partition(":")
        if status not in STATUSES:
            return None
        epoch, _, seq = rest.partition(":")
        since = Position(epoch, int(seq)) if is_epoch(epoch) and seq.isdigit() else None
        return cls(cast(SymbolStatus, status), since if status == "streaming" else None)


# The next leader's starting point: on-demand symbols in priority order, each with the wall-clock
# time since when nobody wants it (None: wanted).
Handover = list[tuple[str, float | None]]


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


def symbol_status_event(symbol: str, verdict: Verdict) -> bytes:
    event: dict[str, object] = {"type": "symbol_status", "symbol": symbol, "status": verdict.status}
    if verdict.since is not None:
        event["since"] = {"epoch": verdict.since.epoch, "seq": verdict.since.seq}
    return orjson.dumps(event)


def parse_symbol_status(event: Any) -> tuple[str, Verdict] | None:
    """(symbol, verdict) of a decoded `symbol_status` control event, else None."""
    if not isinstance(event, dict) or event.get("type") != "symbol_status":
        return None
    symbol, status, since = event.get("symbol"), event.get("status"), event.get("since")
    if not isinstance(symbol, str) or status not in STATUSES:
        return None
    at = None
    if isinstance(since, dict) and is_epoch(since.get("epoch")) and type(since.get("seq")) is int:
        at = Position(since["epoch"], since["seq"])
    return symbol, Verdict(cast(SymbolStatus, status), at if status == "streaming" else None)


def encode_handover(handover: Handover) -> bytes:
    return orjson.dumps({"symbols": [[s, unwanted] for s, unwanted in handover]})


def decode_handover(raw: bytes) -> Handover:
    """The stored handover; [] when it is not one (edited by hand, another version)."""
    try:
        items = orjson.loads(raw)["symbols"]
        return [(str(s), None if u is None else float(u)) for s, u in items]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return []


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

    async def set_status(self, symbol: str, verdict: Verdict) -> None: ...

    async def clear_status(self, symbols: Collection[str]) -> None: ...

    async def reset_statuses(self) -> None:
        """Forget every verdict: a new leader's upstream gives its own."""
        ...

    async def statuses(self, symbols: Collection[str]) -> dict[str, Verdict]: ...

    async def write_handover(self, handover: Handover) -> None: ...

    async def handover(self) -> Handover:
        """What the last leader left (in priority order), [] if nothing."""
        ...


class MemoryDemandStore:
    """One process's demand (`fxproxy demo`, fast tests): every edge sharing it counts as alive."""

    def __init__(self) -> None:
        self.wanted: dict[str, frozenset[str]] = {}
        self.stored_catalog: Catalog | None = None
        self.status: dict[str, Verdict] = {}
        self.stored_handover: Handover = []

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

    async def set_status(self, symbol: str, verdict: Verdict) -> None:
        self.status[symbol] = verdict

    async def clear_status(self, symbols: Collection[str]) -> None:
        for symbol in symbols:
            self.status.pop(symbol, None)

    async def reset_statuses(self) -> None:
        self.status.clear()

    async def statuses(self, symbols: Collection[str]) -> dict[str, Verdict]:
        return {s: self.status[s] for s in symbols if s in self.status}

    async def write_handover(self, handover: Handover) -> None:
        self.stored_handover = list(handover)

    async def handover(self) -> Handover:
        return list(self.stored_handover)


def _statuses(symbols: Iterable[str], raw: Iterable[bytes | None]) -> dict[str, Verdict]:
    out: dict[str, Verdict] = {}
    for symbol, value in zip(symbols, raw, strict=True):
        verdict = Verdict.decode(value.decode(errors="replace")) if value is not None else None
        if verdict is not None:
            out[symbol] = verdict
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

    async def set_status(self, symbol: str, verdict: Verdict) -> None:
        await self.client.hset(self.names.symbol_status, symbol, verdict.encode())

    async def clear_status(self, symbols: Collection[str]) -> None:
        if symbols:
            await self.client.hdel(self.names.symbol_status, *symbols)

    async def reset_statuses(self) -> None:
        await self.client.delete(self.names.symbol_status)

    async def statuses(self, symbols: Collection[str]) -> dict[str, Verdict]:
        wanted = list(symbols)
        if not wanted:
            return {}
        raw = cast(list[bytes | None], await self.client.hmget(self.names.symbol_status, wanted))
        return _statuses(wanted, raw)

    async def write_handover(self, handover: Handover) -> None:
        await self.client.set(self.names.on_demand_handover, encode_handover(handover))

    async def handover(self) -> Handover:
        raw = cast(bytes | None, await self.client.get(self.names.on_demand_handover))
        return decode_handover(raw) if raw is not None else []
