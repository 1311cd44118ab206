"""API keys: where a client puts one, and whether it is valid. Keys are never logged."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers

from shared.keystore import KeyRecord, KeyStore, hash_key


@dataclass(slots=True, frozen=True)
class Identity:
    key_hash: str
    record: KeyRecord


def key_from_request(path: str, headers: Headers) -> str | None:
    """Authorization: Bearer KEY, X-API-Key: KEY, or ?api_key=KEY, in that order."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("X-API-Key")
    if key:
        return key.strip()
    values = parse_qs(urlsplit(path).query).get("api_key")
    return values[0] if values else None


class Authenticator:
    def __init__(self, store: KeyStore | None, static_keys: list[str]) -> None:
        self.store = store
        self._static = [
            (hash_key(key), KeyRecord(name=f"static-{i + 1}")) for i, key in enumerate(static_keys)
        ]

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        """The current record for a key hash (static keys first), or None."""
        found = None
        for static_hash, record in self._static:
            # Compare every static key, in constant time, so timing reveals nothing.
            if hmac.compare_digest(static_hash, key_hash):
                found = record
        if found is None and self.store is not None:
            found = await self.store.get(key_hash)
        return found

    async def authenticate(self, key: str) -> Identity | None:
        if not key or len(key) > 256:
            return None
        key_hash = hash_key(key)
        record = await self.lookup(key_hash)
        if record is None or record.disabled:
            return None
        return Identity(key_hash, record)
