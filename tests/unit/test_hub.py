"""The hub: one frame per message for all, seq dedupe, ordered recovery after an outage."""

from __future__ import annotations

import orjson

from edge.hub import Hub
from shared.tick import Tick, encode_tick


class Recorder:
    """Stands in for a client's Writer; records the seqs it is handed."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_tick(self, symbol: str, frame: bytes) -> None:
        self.frames.append(frame)

    @property
    def seqs(self) -> list[int]:
        return [orjson.loads(f[2:])["seq"] for f in self.frames]


def tick(seq: int, symbol: str = "EURUSD") -> bytes:
    return encode_tick(Tick(symbol, 1.1, 1.2, 1.15, 1, seq))


async def subscribed_hub() -> tuple[Hub, Recorder, Recorder]:
    hub, a, b = Hub(), Recorder(), Recorder()
    await hub.acquire(["EURUSD"])
    hub.attach(a, ["EURUSD"])  # type: ignore[arg-type]
    hub.attach(b, ["EURUSD"])  # type: ignore[arg-type]
    return hub, a, b


async def test_every_subscriber_gets_the_same_frame_object() -> None:
    hub, a, b = await subscribed_hub()
    hub.on_tick("EURUSD", tick(1))
    assert a.frames[0] is b.frames[0]


async def test_duplicates_are_dropped_and_a_restarted_sequence_is_accepted() -> None:
    hub, a, _ = await subscribed_hub()
    for seq in (1, 2, 2, 1, 3, 1):  # a retried batch, then a fresh ingestor on an empty Redis
        hub.on_tick("EURUSD", tick(seq))
    assert a.seqs == [1, 2, 3]
    hub.on_tick("EURUSD", tick(50_000))
    hub.on_tick("EURUSD", tick(1))  # far below the last: the sequence restarted
    assert a.seqs[-2:] == [50_000, 1]


async def test_recovery_replays_missed_ticks_before_the_held_live_ones() -> None:
    hub, a, _ = await subscribed_hub()
    hub.on_tick("EURUSD", tick(1))
    assert hub.hold() == {"EURUSD": 1}
    hub.on_tick("EURUSD", tick(4))  # live ticks arrive while history is read
    hub.on_tick("EURUSD", tick(5))
    assert a.seqs == [1]
    hub.release_held({"EURUSD": [tick(2), tick(3), tick(4)]})
    assert a.seqs == [1, 2, 3, 4, 5]


async def test_overlapping_recoveries_lose_nothing() -> None:
    hub, a, _ = await subscribed_hub()
    hub.on_tick("EURUSD", tick(1))
    hub.hold()
    hub.on_tick("EURUSD", tick(3))
    hub.hold()  # the bus dropped and came back again before the first replay finished
    hub.on_tick("EURUSD", tick(4))
    hub.release_held({"EURUSD": [tick(2)]})
    assert a.seqs == [1, 2]  # still held: the second recovery is running
    hub.release_held({"EURUSD": [tick(3)]})
    assert a.seqs == [1, 2, 3, 4]
