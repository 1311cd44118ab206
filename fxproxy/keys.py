"""Admin commands for API keys: create (shown once), list, update, revoke."""

from __future__ import annotations

import time
from typing import TextIO

from shared.bus import Bus
from shared.keystore import KeyRecord, KeyStore, generate_key, hash_key, key_changed_event


async def create_key(store: KeyStore, name: str, symbols: list[str], max_connections: int) -> str:
    key = generate_key()
    await store.create(hash_key(key), KeyRecord(name, tuple(symbols) or ("*",), max_connections))
    return key


def print_keys(records: list[KeyRecord], out: TextIO) -> None:
    print(f"{'NAME':<24} {'STATUS':<9} {'MAX CONN':>8}  {'CREATED':<20} SYMBOLS", file=out)
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created / 1000))
        status = "revoked" if r.disabled else "active"
        limit = str(r.max_connections) if r.max_connections else "-"
        print(f"{r.name:<24} {status:<9} {limit:>8}  {created:<20} {','.join(r.symbols)}", file=out)


async def _announce(bus: Bus, key_hash: str | None) -> bool:
    """Tell every edge a key changed; they re-read it within a round trip."""
    if key_hash is None:
        return False
    await bus.publish_control(key_changed_event(key_hash))
    return True


async def revoke_key(store: KeyStore, bus: Bus, name: str) -> bool:
    """Disable a key; edges close its connections with 4003."""
    return await _announce(bus, await store.update(name, disabled=True))


async def update_key(store: KeyStore, bus: Bus, name: str, symbols: list[str] | None,
                     max_connections: int | None) -> bool:
    """Change a key; edges unsubscribe what it no longer allows."""
    globs = tuple(symbols) if symbols is not None else None
    return await _announce(bus, await store.update(name, symbols=globs, max_connections=max_connections))
