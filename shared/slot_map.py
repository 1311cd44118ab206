"""Which primary serves which hash slot, as one answering cluster node reports it (CLUSTER SLOTS).

A map may be partial: while a failed primary's replica has not taken over, or when a shard has
no replica at all, its slots are unserved, and only the symbols in those slots wait. Every other
slot keeps its owner, so the live shards' subscriptions go on.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from redis.crc import key_slot
from redis.exceptions import RedisError

Address = tuple[str, int]
SLOTS = 16384

# Asks one node for its CLUSTER SLOTS reply (and closes its connection).
SlotsQuery = Callable[[Address], Awaitable[list[list[Any]]]]


class NoSlotMap(RedisError):
    """No cluster node answered CLUSTER SLOTS."""


class SlotMap:
    def __init__(self, spans: list[tuple[int, int, Address]] | None = None) -> None:
        self.spans = sorted(spans or [])

    def owner(self, name: str) -> Address | None:
        """The primary serving `name`'s slot, or None while that slot is unserved."""
        slot = key_slot(name.encode())
        for lo, hi, address in self.spans:
            if lo <= slot <= hi:
                return address
        return None

    def primaries(self) -> list[Address]:
        return list(dict.fromkeys(a for _, _, a in self.spans))

    def served(self) -> int:
        return sum(hi - lo + 1 for lo, hi, _ in self.spans)


def symbol_in(channel: bytes) -> str:
    """The symbol inside a sharded tick channel's hash tag: `fx:{EURUSD}:tick` -> EURUSD (the
    prefix holds no brace: shared/settings.py refuses one)."""
    return channel.partition(b"{")[2].partition(b"}")[0].decode()


def by_slot(names: list[str], key: Callable[[str], str]) -> list[list[str]]:
    """`names` grouped by the slot of `key(name)`, in order: one SSUBSCRIBE may name channels of
    one slot only."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name in names:
        groups[key_slot(key(name).encode())].append(name)
    return list(groups.values())


async def load_slot_map(query: SlotsQuery, known: SlotMap, seeds: Collection[Address],
                        away: Collection[Address]) -> SlotMap:
    """The map of the first node that answers: the last map's primaries first (after a failover
    the configured seeds may be the ones that are gone, each costing a connect timeout), nodes
    known to be away last. A map that leaves slots unserved is taken as it is."""
    primaries = known.primaries()
    others = [a for a in seeds if a not in primaries]
    order = [*random.sample(primaries, len(primaries)), *random.sample(others, len(others))]
    order.sort(key=lambda a: a in away)  # stable: keeps the order above within each half
    errors: list[str] = []
    for address in order:
        try:
            reply = await query(address)
        except (RedisError, OSError) as exc:
            errors.append(f"{address[0]}:{address[1]}: {type(exc).__name__}: {exc}")
            continue
        found = SlotMap([(int(lo), int(hi), (_text(node[0]) or address[0], int(node[1])))
                         for lo, hi, node, *_ in reply])
        if found.served():
            return found
        errors.append(f"{address[0]}:{address[1]}: serves no slot (not in the cluster yet?)")
    raise NoSlotMap("no cluster node gave a slot map: " + "; ".join(errors))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
