"""API key records: generated at random, stored only as sha256, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol, cast

import orjson
from redis.asyncio import Redis

from shared.names import Names


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

    def allows(self, symbol: str) -> bool:
        return any(fnmatchcase(symbol, pattern) for pattern in self.symbols)

    def to_hash(self) -> dict[str, str]:
        return {
            "name": self.name,
            "symbols": ",".join(self.symbols),
            "max_connections": str(self.max_connections),
            "disabled": "1" if self.disabled else "0",
            "created": str(self.created),
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
            )
        except (KeyError, ValueError):
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
                     max_connections: int | None = None, disabled: bool | None = None) -> str | None:
        """Change the given fields of a key (revoking is disabled=True); its hash, or None."""
        ...

    async def acquire_slot(self, key_hash: str, edge_id: str, limit: int) -> bool:
        """Count one more connection for the key, unless `limit` (> 0) live ones exist."""
        ...

    async def release_slot(self, key_hash: str, edge_id: str) -> None: ...

    async def heartbeat(self, edge_id: str, ttl: float) -> None:
        """Mark this edge alive for `ttl` seconds; slots held by dead edges stop counting."""
        ...


class MemoryKeyStore:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.slots: dict[str, int] = {}

    async def get(self, key_hash: str) -> KeyRecord | None:
        return self.records.get(key_hash)

    async def create(self, key_hash: str, record: KeyRecord) -> None:
        if any(r.name == record.name for r in self.records.values()):
            raise KeyExists(record.name)
        self.records[key_hash] = record

    async def list(self) -> list[KeyRecord]:
        return sorted(self.records.values(), key=lambda r: r.name)

    async def update(self, name: str, *, symbols: tuple[str, ...] | None = None,
                     max_connections: int | None = None, disabled: bool | None = None) -> str | None:
        for key_hash, record in self.records.items():
            if record.name == name:
                if symbols is not None:
                    record.symbols = symbols
                if max_connections is not None:
                    record.max_connections = max_connections
                if disabled is not None:
                    record.disabled = disabled
                return key_hash
        return None

    async def acquire_slot(self, key_hash: str, edge_id: str, limit: int) -> bool:
        if limit > 0 and self.slots.get(key_hash, 0) >= limit:
            return False
        self.slots[key_hash] = self.slots.get(key_hash, 0) + 1
        return True

    async def release_slot(self, key_hash: str, edge_id: str) -> None:
        self.slots[key_hash] = max(0, self.slots.get(key_hash, 0) - 1)

    async def heartbeat(self, edge_id: str, ttl: float) -> None:
        return None


# Counts live connections of a key across edges: fields of dead edges (heartbeat expired)
# are dropped as they are met, so a crashed edge's connections free themselves.
_ACQUIRE = """
local now = tonumber(ARGV[3])
local limit = tonumber(ARGV[2])
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local alive = redis.call('ZSCORE', KEYS[2], fields[i])
  if alive and tonumber(alive) >= now then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
if limit > 0 and total >= limit then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""

_RELEASE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""


class RedisKeyStore:
    def __init__(self, client: Redis, names: Names | None = None) -> None:
        self.client = client
        self.names = names or Names()
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

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
                     max_connections: int | None = None, disabled: bool | None = None) -> str | None:
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
        if changes:
            await self.client.hset(self.names.key_record(key_hash), mapping=changes)  # type: ignore[arg-type]
        return key_hash

    async def acquire_slot(self, key_hash: str, edge_id: str, limit: int) -> bool:
        keys = [self.names.connections(key_hash), self.names.edges]
        return bool(await self._acquire(keys=keys, args=[edge_id, limit, time.time()]))

    async def release_slot(self, key_hash: str, edge_id: str) -> None:
        await self._release(keys=[self.names.connections(key_hash)], args=[edge_id])

    async def heartbeat(self, edge_id: str, ttl: float) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.names.edges, {edge_id: now + ttl})
        pipe.zremrangebyscore(self.names.edges, "-inf", now - 3600)  # long-dead edges
        await pipe.execute()
