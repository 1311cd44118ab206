"""API key records: generated at random, stored only as sha256, looked up by hash."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol, cast

import orjson

from shared.names import Names
from shared.redis_url import AnyRedis

# What an admin may store. Names appear in logs, in `keys list` and in the
# `authenticated` reply, so they are short and printable; symbol globs match
# upper-case symbols (fnmatch: `*` any run, `?` one character).
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
KEY_NAME_RE = re.compile(KEY_NAME_PATTERN)
SYMBOL_GLOB_PATTERN = r"^[A-Z0-9*?@]{1,32}$"
SYMBOL_GLOB_RE = re.compile(SYMBOL_GLOB_PATTERN)


class InvalidKeyField(ValueError):
    """A key name, symbol glob or connection limit that may not be stored; the message says why."""


def printable(text: str, limit: int = 64) -> str:
    """`text` safe for one terminal line: control and non-ASCII characters escaped
    (as Python and bash's $'...' write them), at most `limit` characters shown."""
    escaped = text.encode("unicode_escape").decode("ascii")
    if len(escaped) > limit:
        return f"{escaped[:limit]}...(+{len(escaped) - limit} chars)"
    return escaped


def validate_name(name: str) -> str:
    """The name, if it matches KEY_NAME_PATTERN; else InvalidKeyField."""
    if KEY_NAME_RE.fullmatch(name) is None:
        raise InvalidKeyField(
            f"bad key name '{printable(name, 40)}': use 1-64 characters A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit")
    return name


def validate_symbols(globs: Iterable[str]) -> tuple[str, ...]:
    """Symbol globs, each matching SYMBOL_GLOB_PATTERN; none at all is refused (use `*`)."""
    out = tuple(globs)
    if not out:
        raise InvalidKeyField("no symbols given: list symbol globs such as 'EUR*,GBPUSD', "
                              "or '*' for all symbols")
    for glob in out:
        if SYMBOL_GLOB_RE.fullmatch(glob) is None:
            raise InvalidKeyField(
                f"bad symbol glob '{printable(glob, 40)}': use 1-32 characters A-Z 0-9 * ? @ "
                "(symbols are upper case), e.g. 'EUR*,GBPUSD'")
    return out


def validate_max_connections(limit: int) -> int:
    if limit < 0:
        raise InvalidKeyField(f"bad max connections {limit}: use 0 (no limit) or more")
    return limit


MAX_RATE_LIMIT = 1000.0  # ticks a second per symbol: the most a client may ask for or be granted


def validate_max_rate(rate: float) -> float:
    if not 0 <= rate <= MAX_RATE_LIMIT:
        raise InvalidKeyField(f"bad max rate {rate:g}: use 0 (unthrottled) up to {MAX_RATE_LIMIT:g} "
                              "ticks a second per symbol")
    return rate


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new API key: 192 random bits, URL-safe."""
    return "fxp_" + secrets.token_urlsafe(24)


@dataclass(slots=True)
class KeyRecord:
    name: str
    symbols: tuple[str, ...] = ("*",)  # globs, matched case-sensitively
    max_connections: int = 0  # across the cluster; 0 = no limit
    disabled: bool = False
    created: int = field(default_factory=lambda: int(time.time() * 1000))
    max_rate: float = 0.0  # ticks a second per symbol its clients get at most; 0 = unthrottled

    def allows(self, symbol: str) -> bool:
        return any(fnmatchcase(symbol, pattern) for pattern in self.symbols)

    def to_hash(self) -> dict[str, str]:
        return {
            "name": self.name,
            "symbols": ",".join(self.symbols),
            "max_connections": str(self.max_connections),
            "disabled": "1" if self.disabled else "0",
            "created": str(self.created),
            "max_rate": repr(self.max_rate),
        }

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> KeyRecord:
        """Parse a stored record; one edited into nonsense by hand counts as disabled."""
        d = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
        try:
            return cls(
                name=d["name"],
                symbols=tuple(s for s in d.get("symbols", "*").split(",") if s),
                max_connections=int(d.get("max_connections", "0")),
                disabled=d.get("disabled") == "1",
                created=int(d.get("created", "0")),
                max_rate=validate_max_rate(float(d.get("max_rate", "0"))),
            )
        except (KeyError, ValueError):  # InvalidKeyField is a ValueError too
            return cls(name=d.get("name", "invalid-record"), disabled=True)


def key_changed_event(key_hash: str) -> bytes:
    return orjson.dumps({"type": "key_changed", "key": key_hash})


class KeyExists(Exception):
    pass


class KeyStore(Protocol):
    async def get(self, key_hash: str) -> KeyRecord | None: ...

    async def create(self, key_hash: str, record: KeyRecord) -> None:
        """Store a new record; raise KeyExists if its name is taken."""
        ...

    async def list(self) -> list[KeyRecord]: ...

    async def update(self, name: str, *, symbols: tuple[str, ...] | None = None,
                     max_connections: int | None = None, disabled: bool | None = None,
                     max_rate: float | None = None) -> str | None:
        """Change the given fields of a key (revoking is disabled=True); its hash, or None."""
        ...

    async def acquire_slot(self, key_hash: str, edge_id: str, limit: int) -> bool:
        """Count one more connection for the key, unless `limit` (> 0) live ones exist."""
        ...

    async def release_slot(self, key_hash: str, edge_id: str) -> None: ...

    async def trim_slots(self, key_hash: str, edge_id: str, limit: int) -> int:
        """After a key's limit was lowered: how many of this edge's connections must close.

        Counts the key's live connections across live edges (as acquire_slot does);
        if they exceed `limit` (> 0), takes min(excess, this edge's count) off this
        edge's count and returns it, else 0. Atomic, so when every edge calls it in
        turn the cluster closes exactly the excess. The slots returned are given up
        here: close that many connections without calling release_slot for them.
        """
        ...

    async def heartbeat(self, edge_id: str, ttl: float) -> None:
        """Mark this edge alive for `ttl` seconds; slots held by dead edges stop counting."""
        ...

    async def forget_edge(self, edge_id: str) -> None:
        """Count an edge known to be dead as dead now, not when its heartbeat expires."""
        ...


class MemoryKeyStore:
    """One process's keys; every edge sharing it counts as alive (no heartbeats needed)."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.conns: dict[str, dict[str, int]] = {}  # key hash -> edge id -> connections

    @property
    def slots(self) -> dict[str, int]:
        """Key hash -> connections counted across edges."""
        return {key_hash: sum(edges.values()) for key_hash, edges in self.conns.items()}

    async def get(self, key_hash: str) -> KeyRecord | None:
        return self.records.get(key_hash)

    async def create(self, key_hash: str, record: KeyRecord) -> None:
        if any(r.name == record.name for r in self.records.values()):
            raise KeyExists(record.name)
        self.records[key_hash] = record

    async def list(self) -> list[KeyRecord]:
        return sorted(self.records.values(), key=lambda r: r.name)

    async def update(self, name: str, *, symbols: tuple[str, ...] | None = None,
                     max_connections: int | None = None, disabled: bool | None = None,
                     max_rate: float | None = None) -> str | None:
        for key_hash, record in self.records.items():
            if record.name == name:
                if symbols is not None:
                    record.symbols = symbols
                if max_connections is not None:
                    record.max_connections = max_connections
                if disabled is not None:
                    record.disabled = disabled
                if max_rate is not None:
                    record.max_rate = max_rate
                return key_hash
        return None

    async def acquire_slot(self, key_hash: str, edge_id: str, limit: int) -> bool:
        edges = self.conns.setdefault(key_hash, {})
        if limit > 0 and sum(edges.values()) >= limit:
            return False
        edges[edge_id] = edges.get(edge_id, 0) + 1
        return True

    async def release_slot(self, key_hash: str, edge_id: str) -> None:
        edges = self.conns.get(key_hash, {})
        n = edges.get(edge_id, 0) - 1
        if n > 0:
            edges[edge_id] = n
        else:
            edges.pop(edge_id, None)

    async def trim_slots(self, key_hash: str, edge_id: str, limit: int) -> int:
        edges = self.conns.get(key_hash, {})
        mine = edges.get(edge_id, 0)
        excess = sum(edges.values()) - limit
        if limit <= 0 or excess <= 0 or mine <= 0:
            return 0
        cut = min(excess, mine)
        if cut < mine:
            edges[edge_id] = mine - cut
        else:
            del edges[edge_id]
        return cut

    async def heartbeat(self, edge_id: str, ttl: float) -> None:
        return None

    async def forget_edge(self, edge_id: str) -> None:
        for edges in self.conns.values():
            edges.pop(edge_id, None)


# Counts live connections of a key across edges (KEYS[1] fx:conns:{hash}, KEYS[2] fx:edges;
# ARGV[1] edge id, ARGV[2] limit, ARGV[3] now): fields of dead edges (heartbeat expired)
# are dropped as they are met, so a crashed edge's connections free themselves.
_COUNT_LIVE = """
local now = tonumber(ARGV[3])
local limit = tonumber(ARGV[2])
local total = 0
local mine = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local alive = redis.call('ZSCORE', KEYS[2], fields[i])
  if alive and tonumber(alive) >= now then
    local n = tonumber(fields[i + 1])
    total = total + n
    if fields[i] == ARGV[1] then mine = n end
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
"""

_ACQUIRE = _COUNT_LIVE + """
if limit > 0 and total >= limit then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""

# Gives up this edge's share of the excess over a lowered limit; returns how many.
_TRIM = _COUNT_LIVE + """
if limit <= 0 or total <= limit or mine <= 0 then return 0 end
local cut = math.min(total - limit, mine)
if cut == mine then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], ARGV[1], -cut)
end
return cut
"""

_RELEASE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""


class RedisKeyStore:
    def __init__(self, client: AnyRedis, names: Names | None = None) -> None:
        self.client = client
        self.names = names or Names()
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._trim = client.register_script(_TRIM)

    async def get(self, key_hash: str) -> KeyRecord | None:
        raw = cast(dict[bytes, bytes], await self.client.hgetall(self.names.key_record(key_hash)))
        return KeyRecord.from_hash(raw) if raw else None

    async def create(self, key_hash: str, record: KeyRecord) -> None:
        if not await self.client.hsetnx(self.names.key_names, record.name, key_hash):
            raise KeyExists(record.name)
        await self.client.hset(
            self.names.key_record(key_hash),
            mapping=record.to_hash(),  # type: ignore[arg-type]
        )

    async def list(self) -> list[KeyRecord]:
        hashes = cast(dict[bytes, bytes], await self.client.hgetall(self.names.key_names))
        records = [await self.get(h.decode()) for h in hashes.values()]
        return sorted((r for r in records if r is not None), key=lambda r: r.name)

    async def update(self, name: str, *, symbols: tuple[str, ...] | None = None,
                     max_connections: int | None = None, disabled: bool | None = None,
                     max_rate: float | None = None) -> str | None:
        raw = cast(bytes | None, await self.client.hget(self.names.key_names, name))
        if raw is None:
            return None
        key_hash = raw.decode()
        changes: dict[str, str] = {}
        if symbols is not None:
            changes["symbols"] = ",".join(symbols)
        if max_connections is not None:
            changes["max_connections"] = str(max_connections)
        if disabled is not None:
            changes["disabled"] = "1" if disabled else "0"
        if max_rate is not None:
            changes["max_rate"] = repr(max_rate)
        if changes:
            await self.client.hset(self.names.key_record(key_hash), mapping=changes)  # type: ignore[arg-type]
        return key_hash

    async def acquire_slot(self, key_hash: str, edge_id: str, limit: int) -> bool:
        keys = [self.names.connections(key_hash), self.names.edges]
        return bool(await self._acquire(keys=keys, args=[edge_id, limit, time.time()]))

    async def release_slot(self, key_hash: str, edge_id: str) -> None:
        await self._release(keys=[self.names.connections(key_hash)], args=[edge_id])

    async def trim_slots(self, key_hash: str, edge_id: str, limit: int) -> int:
        keys = [self.names.connections(key_hash), self.names.edges]
        return int(await self._trim(keys=keys, args=[edge_id, limit, time.time()]))

    async def heartbeat(self, edge_id: str, ttl: float) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.names.edges, {edge_id: now + ttl})
        pipe.zremrangebyscore(self.names.edges, "-inf", now - 3600)  # long-dead edges
        await pipe.execute()

    async def forget_edge(self, edge_id: str) -> None:
        # Off the live list, its fields in fx:conns:* are dropped as the slot scripts meet them.
        await self.client.zrem(self.names.edges, edge_id)
