"""Arbitrary frames thrown at a live edge: it answers, stays up, and others see no gap."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from edge.app import EdgeApp
from shared.keystore import MemoryKeyStore
from shared.memory_bus import MemoryBus
from shared.settings import EdgeSettings
from tests.component.conftest import STATIC_KEY, Edge
from tests.support.client import live_ticks, open_native, recv_json, send_json

fuzz_frames = st.lists(
    st.binary(max_size=300)
    | st.text(max_size=300)
    | st.sampled_from(['{"op":"subscribe","symbols":["EURUSD"]}', '{"op":"auth","key":"x"}',
                       '{"op":"unsubscribe","symbols":["EURUSD"]}', '{"op":"ping"}', "{}", "[]"]),
    min_size=1, max_size=40,
)


async def _run(frames: list[str | bytes]) -> None:
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], max_strikes=15,
                            log_format="console", log_level="warning")
    bus = MemoryBus()
    app = EdgeApp(settings, bus, MemoryKeyStore())
    edge = Edge(app, bus, MemoryKeyStore(), await app.start())
    try:
        await edge.tick("EURUSD")
        async with await open_native(edge.port, STATIC_KEY) as good, \
                await open_native(edge.port, STATIC_KEY, max_queue=None) as fuzz:
            await send_json(good, {"op": "subscribe", "symbols": ["EURUSD"]})
            await recv_json(good)
            await recv_json(good)
            for i, frame in enumerate(frames):
                try:
                    await fuzz.send(frame)
                except ConnectionClosed:
                    break
                if i % 5 == 0:
                    await edge.tick("EURUSD")
            await edge.tick("EURUSD")
            expected = edge.seqs["EURUSD"] - 1
            seqs = [t["seq"] for t in await live_ticks(good, expected, timeout=5)]
            assert seqs == list(range(2, 2 + expected))
            if fuzz.close_code is not None:  # closing an abuser is fine; with these codes only
                assert fuzz.close_code in (1007, 1008, 1009, 4001)
        async with await open_native(edge.port, STATIC_KEY) as fresh:  # still serving
            await send_json(fresh, {"op": "ping", "id": 1})
            assert await recv_json(fresh) == {"type": "pong", "id": 1}
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_frames)
def test_live_edge_survives_arbitrary_frames(frames: list[str | bytes]) -> None:
    asyncio.run(_run(frames))
