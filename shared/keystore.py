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
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            name=d["name"],
            symbols=tuple(s for s in d.get("symbols", "*").split(",") if s),
            max_connections=int(d.get("max_connections", "0")),
            disabled=d.get("disabled") == "1",
            created=int(d.get("created", "0")),
        )


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

    async def revoke(self, name: str) -> str | None:
        """Disable the key with this name; return its hash, or None if unknown."""
        ...


class MemoryKeyStore:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}

    async def get(self, key_hash: str) -> KeyRecord | None:
        return self.records.get(key_hash)

    async def create(self, key_hash: str, record: KeyRecord) -> None:
        if any(r.name == record.name for r in self.records.values()):
            raise KeyExists(record.name)
        self.records[key_hash] = record

    async def list(self) -> list[KeyRecord]:
        return sorted(self.records.values(), key=lambda r: r.name)

    async def revoke(self, name: str) -> str | None:
        for key_hash, record in self.records.items():
            if record.name == name:
                record.disabled = True
                return key_hash
        return None


class RedisKeyStore:
    def __init__(self, client: Redis, names: Names | None = None) -> None:
        self.client = client
        self.names = names or Names()

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

    async def revoke(self, name: str) -> str | None:
        raw = cast(bytes | None, await self.client.hget(self.names.key_names, name))
        if raw is None:
            return None
        key_hash = raw.decode()
        await self.client.hset(self.names.key_record(key_hash), "disabled", "1")
        return key_hash
