"""Which symbols go on which vendor session, within the vendor's limits (sans I/O)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    sessions: tuple[frozenset[str], ...]  # by slot; an empty slot is a closed session
    refused: tuple[str, ...]  # over capacity, in priority order


def plan(current: Sequence[frozenset[str]], wanted: Sequence[str], per_session: int,
         max_sessions: int, excluded: Mapping[str, Collection[int]] | None = None) -> Plan:
    """Place `wanted` (highest priority first) on at most `max_sessions` slots of `per_session`
    symbols each (0 = unlimited). Symbols stay where they are; new ones fill open sessions before
    a new one opens; a session whose symbols fit in the others is emptied into them. A symbol is
    never put on a slot `excluded` names for it (the vendor found no room for it there): with no
    other slot that has room, it is refused."""
    excluded = excluded or {}
    limit = per_session or len(wanted) or 1
    slots_n = max_sessions if per_session else 1
    admitted = list(dict.fromkeys(wanted))
    refused = admitted[limit * slots_n:]
    keep = admitted[:limit * slots_n]
    keeping = set(keep)
    slots = [set(current[i]) & keeping if i < len(current) else set() for i in range(slots_n)]
    # A symbol on two slots (the caller's mistake, or a shrunk limit) stays on the first only.
    seen: set[str] = set()
    for i, slot in enumerate(slots):
        slot -= seen
        slot -= {s for s in slot if i in excluded.get(s, ())}
        while len(slot) > limit:
            slot.remove(max(slot))
        seen |= slot
    for symbol in keep:
        if symbol not in seen:
            if _place(slots, symbol, limit, excluded.get(symbol, ())):
                seen.add(symbol)
            else:
                refused.append(symbol)
    _compact(slots, limit, excluded)
    order = {s: i for i, s in enumerate(admitted)}
    return Plan(tuple(frozenset(s) for s in slots), tuple(sorted(refused, key=order.__getitem__)))


def _place(slots: list[set[str]], symbol: str, limit: int, excluded: Collection[int]) -> bool:
    allowed = [s for i, s in enumerate(slots) if i not in excluded]
    target = next((s for s in allowed if s and len(s) < limit), None)
    if target is None:
        target = next((s for s in allowed if not s), None)
    if target is None:
        return False
    target.add(symbol)
    return True


def _compact(slots: list[set[str]], limit: int, excluded: Mapping[str, Collection[int]]) -> None:
    """Close sessions while the others have room for their symbols (and may carry them)."""
    while True:
        used = [i for i, s in enumerate(slots) if s]
        if len(used) < 2:
            return
        # The last of the smallest: keep low slots stable.
        smallest = min(reversed(used), key=lambda i: len(slots[i]))
        others = [i for i in used if i != smallest]
        room = {i: limit - len(slots[i]) for i in others}
        moves: list[tuple[str, int]] = []
        for symbol in sorted(slots[smallest]):
            target = next((i for i in others if room[i] > 0 and i not in excluded.get(symbol, ())), None)
            if target is None:
                return
            room[target] -= 1
            moves.append((symbol, target))
        for symbol, target in moves:
            slots[target].add(symbol)
        slots[smallest].clear()
