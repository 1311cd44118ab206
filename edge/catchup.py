"""What a subscriber gets before live ticks, sans I/O: a snapshot, or an exact replay after `since`.

Recovery is all or nothing (as in Centrifugo): a replay is sent only when history holds every
tick from the client's position to the newest one, in the same epoch, within the limits;
otherwise the client gets `recovered: false` and a snapshot. Never a hole, never a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.protocol import Since
from shared.tick import Position, mark_snapshot, position_of

Last = tuple[Position, bytes]


@dataclass(slots=True, frozen=True)
class CatchUp:
    frames: list[bytes]  # native payloads to send, in order, before live ticks
    position: Position  # where the client stands once they are sent
    payload: bytes  # the tick at `position`
    recovered: bool | None  # None when the client did not ask to resume
    short: bool = False  # history ended before the newest tick: read it again, it may have grown


def newest(live: Last | None, stored: bytes | None) -> Last | None:
    """The newer of the edge's own last tick and Redis's; on an epoch change, the edge's.

    The edge's stream is what the client will get next, so its epoch is the one to follow:
    if Redis is already in a newer epoch, the edge announces it with a reset when it gets there.
    """
    if stored is None:
        return live
    try:
        from_store = (position_of(stored), stored)
    except ValueError:
        return live
    if live is None:
        return from_store
    if live[0].epoch != from_store[0].epoch or live[0].seq >= from_store[0].seq:
        return live
    return from_store


def replay_size(since: Since, live: Last | None, stored: bytes | None, replay_limit: int) -> int:
    """How many ticks a replay after `since` needs: 0 when none is needed or none can be given.

    Lets the caller read no history at all for a resume that will be refused anyway.
    """
    top = newest(live, stored)
    if top is None or (since.epoch or top[0].epoch) != top[0].epoch:
        return 0
    need = top[0].seq - since.seq
    return need if 0 < need <= replay_limit else 0


def catch_up(since: Since | None, live: Last | None, stored: bytes | None,
             history: list[bytes] | None, replay_limit: int, byte_budget: int) -> CatchUp | None:
    """Plan one symbol's catch-up; None when the symbol has never ticked (unknown)."""
    top = newest(live, stored)
    if top is None:
        return None
    (pos, payload) = top
    snapshot = CatchUp([mark_snapshot(payload)], pos, payload, None if since is None else False)
    if since is None:
        return snapshot
    if (since.epoch or pos.epoch) != pos.epoch or since.seq > pos.seq:
        return snapshot  # another epoch, or a position we never published
    if since.seq == pos.seq:
        return CatchUp([], pos, payload, True)
    if pos.seq - since.seq > replay_limit:
        return snapshot
    frames: list[bytes] = []
    size = 0
    expect = since.seq + 1
    for entry in history or ():
        try:
            at = position_of(entry)
        except ValueError:
            break
        if at.epoch == pos.epoch and at.seq < expect:
            continue  # history and the edge's recent ticks overlap
        if at.epoch != pos.epoch or at.seq != expect or len(frames) >= replay_limit:
            break
        size += len(entry)
        if size > byte_budget:
            return snapshot  # the replay would not fit the client's buffer: refuse, don't queue
        frames.append(entry)
        expect += 1
    if not frames or expect - 1 < pos.seq:
        # History does not reach the newest tick: trimmed away, or the edge moved on while we read.
        return CatchUp(snapshot.frames, pos, payload, False, short=bool(frames))
    last = frames[-1]
    return CatchUp(frames, position_of(last), last, True)
