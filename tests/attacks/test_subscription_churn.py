"""Clients that vanish mid-subscribe leak nothing: not in the hub, not on the bus, not in Redis.

Issue 8: 200 connections that subscribed to 100 new symbols and closed left 20,000 subscriptions
on the edge and in Redis until restart.
"""

from __future__ import annotations

import asyncio
import itertools
import string
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis.asyncio as aioredis

from fxproxy.simfeed import PAIRS
from tests.conftest import API_KEY, Cluster
from tests.support.attackers import connect_ws, rst_close, text
from tests.support.procs import metric

from .measure import edge_errors, neighbour

pytestmark = pytest.mark.integration

REAL = sorted(PAIRS)  # 18 symbols the feed carries: these get snapshots and attach
# The static key allows any symbol: names the feed never carries still reach the hub and the bus
# while the edge looks them up (then `unknown_symbol`).
MADE_UP = ["Q" + a + b + "USD" for a, b in itertools.product(string.ascii_uppercase, repeat=2)]
CHURNERS = 200


async def test_clients_reset_mid_subscribe_leave_exactly_the_neighbours_channels(cluster: Cluster) -> None:
    cluster.simfeed(rate=20)
    cluster.ingestor(symbols=",".join(REAL))
    proc, port = cluster.edge(FXPROXY_HANDSHAKE_RATE="1000", FXPROXY_HANDSHAKE_BURST="1000")

    def churn(i: int) -> None:
        """Subscribe to 100 symbols (18 real, 82 never seen), then vanish with a TCP reset, after
        0-98 ms: the edge is anywhere from reading the frame to having attached every symbol."""
        symbols = REAL + MADE_UP[(i * 82) % len(MADE_UP):][:82]
        symbols += MADE_UP[: 100 - len(symbols)]
        client = connect_ws(port, key=API_KEY)
        try:
            client.send(text({"op": "subscribe", "symbols": symbols, "id": i}))
            time.sleep((i % 50) * 0.002)
        finally:
            rst_close(client.sock)

    r = aioredis.Redis.from_url(cluster.redis_url)
    peak = 0

    async def watch(stop: asyncio.Event) -> None:
        """Evidence the churn reached the bus: the most fx:tick channels seen while it ran."""
        nonlocal peak
        for _ in range(1000):
            peak = max(peak, len(await r.pubsub_channels("fx:tick:*")))
            if stop.is_set():
                return
            await asyncio.sleep(0.02)

    async with neighbour(port, cluster.redis_url) as good:
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        stop = asyncio.Event()
        watcher = loop.create_task(watch(stop))
        with ThreadPoolExecutor(max_workers=20) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, churn, i) for i in range(CHURNERS)))
        churned = time.monotonic() - start
        stop.set()
        await watcher
        wanted = {f"fx:tick:{s}".encode() for s in good.symbols}
        try:
            deadline = time.monotonic() + 10
            while True:
                channels = set(await r.pubsub_channels("fx:tick:*"))
                gauge = metric(port, "fxproxy_edge_bus_symbols")
                if (channels == wanted and gauge == len(wanted)) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            settled = time.monotonic() - start - churned
        finally:
            await r.aclose()
        unknown = metric(port, 'fxproxy_edge_client_errors_total{code="unknown_symbol"}', 0)
        print(f"\n{CHURNERS} clients x 100 symbols reset mid-subscribe in {churned:.1f} s (up to "
              f"{peak} fx:tick channels meanwhile; {unknown:.0f} subscribes got as far as "
              f"unknown_symbol); {settled:.2f} s later Redis has {len(channels)} fx:tick channels, "
              f"the edge's fxproxy_edge_bus_symbols is {gauge:.0f} (the neighbour needs {len(wanted)})")
        assert peak > len(wanted), "the churn never reached the bus: the test tests nothing"
        assert channels == wanted, f"leaked: {sorted(channels - wanted)[:10]}, lost: {wanted - channels}"
        assert gauge == len(wanted)
        assert metric(port, "fxproxy_edge_connections") == 1
        await asyncio.sleep(0.5)  # still ticking after the churn
        good.assert_contiguous()
    assert not edge_errors(proc.log)
