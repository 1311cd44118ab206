"""The per-client writer: one write per loop turn, conflation while behind, a byte budget."""

from __future__ import annotations

import asyncio

import orjson

from edge.protocol import frame_payload, text_frame
from edge.writer import Flusher, Writer


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def make(slow_timeout: float = 10.0, budget: int = 1 << 20) -> tuple[Writer, FakeTransport, list[str]]:
    transport, events = FakeTransport(), []
    writer = Writer(transport, Flusher(), budget, slow_timeout, events.append)  # type: ignore[arg-type]
    return writer, transport, events


async def test_frames_queued_in_one_loop_turn_leave_in_one_write() -> None:
    writer, transport, _ = make()
    writer.send_tick("EURUSD", b"a")
    writer.send_tick("GBPUSD", b"b")
    writer.send(b"c")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"abc"]


async def test_paused_writer_keeps_latest_tick_per_symbol_and_all_control_frames() -> None:
    writer, transport, _ = make()
    writer.pause()
    for frame in (b"E1", b"E2", b"E3"):
        writer.send_tick("EURUSD", frame)
    writer.send_tick("GBPUSD", b"G1")
    writer.send(b"reply")
    await asyncio.sleep(0)
    assert transport.writes == []
    writer.resume()
    await asyncio.sleep(0)
    assert transport.writes[0].startswith(b"reply")
    assert transport.writes[0].endswith(b"G1")  # G1 was never replaced: sent as is


async def test_a_tick_that_replaced_others_is_marked_conflated() -> None:
    writer, transport, _ = make()
    writer.set_lagging(True)
    for seq in (1, 2, 3):
        writer.send_tick("EURUSD", text_frame(b'{"type":"tick","seq":%d}' % seq))
    writer.set_lagging(False)
    await asyncio.sleep(0)
    assert orjson.loads(frame_payload(transport.writes[0])) == {"type": "tick", "seq": 3, "conflated": True}


async def test_writer_behind_longer_than_timeout_reports_slow_once() -> None:
    writer, _, events = make(slow_timeout=0.05)
    writer.pause()
    writer.set_lagging(True)
    await asyncio.sleep(0.1)
    assert events == ["it stayed behind"]


async def test_catching_up_in_time_cancels_slow_close() -> None:
    writer, _, events = make(slow_timeout=0.05)
    writer.set_lagging(True)
    writer.set_lagging(False)
    await asyncio.sleep(0.1)
    assert events == []


async def test_replies_past_the_budget_close_the_client_instead_of_growing() -> None:
    writer, _, events = make(budget=100)
    writer.pause()
    assert all(writer.send(b"x" * 30) for _ in range(3))
    assert not writer.send(b"x" * 30)
    assert events == ["its outgoing buffer is full"]
    assert writer.pending_bytes == 90


async def test_write_delay_holds_frames_for_one_batched_write() -> None:
    transport = FakeTransport()
    writer = Writer(transport, Flusher(delay=0.05), 1 << 20, 10.0, lambda _: None)  # type: ignore[arg-type]
    writer.send_tick("EURUSD", b"a")
    await asyncio.sleep(0.01)
    writer.send_tick("EURUSD", b"b")
    await asyncio.sleep(0)
    assert transport.writes == []
    await asyncio.sleep(0.08)
    assert transport.writes == [b"ab"]
