"""The per-client writer: one write per loop turn, conflation while paused, slow close."""

from __future__ import annotations

import asyncio

from edge.writer import Flusher, Writer


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def make(slow_timeout: float = 10.0) -> tuple[Writer, FakeTransport, list[str]]:
    transport, events = FakeTransport(), []
    writer = Writer(transport, Flusher(), slow_timeout, lambda: events.append("slow"))  # type: ignore[arg-type]
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
    assert transport.writes == [b"replyE3G1"]


async def test_writer_paused_longer_than_timeout_reports_slow_once() -> None:
    writer, _, events = make(slow_timeout=0.05)
    writer.pause()
    await asyncio.sleep(0.1)
    assert events == ["slow"]


async def test_resume_in_time_cancels_slow_close() -> None:
    writer, _, events = make(slow_timeout=0.05)
    writer.pause()
    writer.resume()
    await asyncio.sleep(0.1)
    assert events == []


async def test_write_delay_holds_frames_for_one_batched_write() -> None:
    transport = FakeTransport()
    writer = Writer(transport, Flusher(delay=0.05), 10.0, lambda: None)  # type: ignore[arg-type]
    writer.send_tick("EURUSD", b"a")
    await asyncio.sleep(0.01)
    writer.send_tick("EURUSD", b"b")
    await asyncio.sleep(0)
    assert transport.writes == []
    await asyncio.sleep(0.08)
    assert transport.writes == [b"ab"]
