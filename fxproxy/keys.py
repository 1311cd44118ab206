"""Admin commands for API keys: create (shown once), list, update, revoke.

What may be stored is checked here, before anything reaches Redis: names match
`KEY_NAME_PATTERN`, symbols are globs matching `SYMBOL_GLOB_PATTERN` (an empty list
is refused: `*` means all symbols), and connection limits are 0 (none) or more.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

from shared.bus import Bus
from shared.keystore import (
    KeyRecord,
    KeyStore,
    generate_key,
    hash_key,
    key_changed_event,
    printable,
    validate_max_connections,
    validate_max_rate,
    validate_name,
    validate_symbols,
)
from shared.settings import split_csv


def parse_symbols(value: str) -> tuple[str, ...]:
    """`--symbols 'EUR*, GBPUSD'` -> validated globs; '' (or only commas) is refused."""
    return validate_symbols(split_csv(value))


async def create_key(store: KeyStore, name: str, symbols: Sequence[str], max_connections: int,
                     max_rate: float = 0.0) -> str:
    """Store a new key (raises InvalidKeyField, KeyExists); the key itself, shown once."""
    record = KeyRecord(validate_name(name), validate_symbols(symbols),
                       validate_max_connections(max_connections), max_rate=validate_max_rate(max_rate))
    key = generate_key()
    await store.create(hash_key(key), record)
    return key


def print_keys(records: list[KeyRecord], out: TextIO) -> None:
    """The table of `keys list`; names and globs of records stored before validation
    existed are escaped, so no record can move the cursor or break a line."""
    print(f"{'NAME':<24} {'STATUS':<9} {'MAX CONN':>8} {'MAX RATE':>8}  {'CREATED':<20} SYMBOLS", file=out)
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created / 1000))
        status = "revoked" if r.disabled else "active"
        limit = str(r.max_connections) if r.max_connections else "-"
        rate = f"{r.max_rate:g}/s" if r.max_rate else "-"
        name = printable(r.name) if r.name else "''"
        symbols = printable(",".join(r.symbols), 200)
        print(f"{name:<24} {status:<9} {limit:>8} {rate:>8}  {created:<20} {symbols}", file=out)


async def _announce(bus: Bus, key_hash: str | None) -> bool:
    """Tell every edge a key changed; they re-read it within a round trip."""
    if key_hash is None:
        return False
    await bus.publish_control(key_changed_event(key_hash))
    return True


async def revoke_key(store: KeyStore, bus: Bus, name: str) -> bool:
    """Disable a key; edges close its connections with 4003.

    The name is not checked against the pattern: a record stored before names were
    validated must stay revocable (it is only looked up).
    """
    return await _announce(bus, await store.update(name, disabled=True))


async def update_key(store: KeyStore, bus: Bus, name: str, symbols: Sequence[str] | None,
                     max_connections: int | None, max_rate: float | None = None) -> bool:
    """Change a key (raises InvalidKeyField); edges re-read it at once and unsubscribe
    what it no longer allows (a lowered limit is for them to apply: KeyStore.trim_slots)."""
    globs = validate_symbols(symbols) if symbols is not None else None
    limit = validate_max_connections(max_connections) if max_connections is not None else None
    rate = validate_max_rate(max_rate) if max_rate is not None else None
    return await _announce(bus, await store.update(name, symbols=globs, max_connections=limit,
                                                   max_rate=rate))
