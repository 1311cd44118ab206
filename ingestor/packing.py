"""Which symbols go on which vendor session, within the vendor's limits (sans I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    sessions: tuple[frozenset[str], ...]  # by slot; an empty slot is a closed session
    refused: tuple[str, ...]  # over capacity, in priority order


def plan(current: Sequence[frozenset[str]], wanted: Sequence[str], per_session: int,
         max_sessions: int) -> Plan:
    """Place `wanted` (highest priority first) on at most `max_sessions` slots of `per_session`
    symbols each (0 = unlimited). Symbols stay where they are; new ones fill open sessions before
    a new one opens; a session whose symbols fit in the others is emptied into them."""
    limit = per_session or len(wanted) or 1
    slots_n = max_sessions if per_session else 1
    admitted = list(dict.fromkeys(wanted))
    refused = tuple(admitted[limit * slots_n:])
    keep = set(admitted[:limit * slots_n])
    slots = [set(current[i]) & keep if i < len(current) else set() for i in range(slots_n)]
    # A symbol on two slots (the caller's mistake, or a shrunk limit) stays on the first only.
    seen: set[str] = set()
    for slot in slots:
        slot -= seen
        while len(slot) > limit:
            slot.remove(max(slot))
        seen |= slot
    for symbol in admitted[:limit * slots_n]:
        if symbol not in seen:
            _place(slots, symbol, limit)
            seen.add(symbol)
    _compact(slots, limit)
    return Plan(tuple(frozenset(s) for s in slots), refused)


def _place(slots: list[set[str]], symbol: str, limit: int) -> None:
    open_ = [s for s in slots if s and len(s) < limit]
    target = open_[0] if open_ else next(s for s in slots if not s)
    target.add(symbol)


def _compact(slots: list[set[str]], limit: int) -> None:
    """Close sessions while the others have room for their symbols."""
    while True:
        used = [s for s in slots if s]
        if len(used) < 2:
            return
        smallest = min(reversed(used), key=len)  # the last of the smallest: keep low slots stable
        room = sum(limit - len(s) for s in used if s is not smallest)
        if room < len(smallest):
            return
        for symbol in sorted(smallest):
            target = next(s for s in used if s is not smallest and len(s) < limit)
            target.add(symbol)
        smallest.clear()
