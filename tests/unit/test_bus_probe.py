"""The bus probe: a loop that must end when its task is cancelled, whatever it was doing."""

from __future__ import annotations

import asyncio

from shared.bus_probe import BusProbe


async def test_a_cancelled_probe_ends_even_when_the_cancel_meets_an_instant_pings_completion() -> None:
    # An in-memory bus answers a ping at once; asyncio.wait_for on 3.11 would return the ping's
    # result instead of raising a cancel that lands in that instant, and the loop would go on.
    async def ping() -> None:
        return None

    hung = 0
    for turns in range(200):
        task = asyncio.create_task(BusProbe(ping, interval=0.001).run())
        for _ in range(turns % 7):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.2)
        if not done:
            hung += 1
            task.cancel()
            await asyncio.wait([task], timeout=0.2)
    assert hung == 0, f"{hung} of 200 cancelled probes kept running"
