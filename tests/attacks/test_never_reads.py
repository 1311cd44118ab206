"""Clients that send and never read cost the edge a bounded amount of memory.

Issue 8: a key-less client sending pings and never reading grew the edge from 50 to 230 MB in
8 s; ten non-reading connections asking for `since: 0` replays took it from 63 to 442 MB in 7 s.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from fxproxy.simfeed import PAIRS
from tests.conftest import API_KEY, Cluster
from tests.support.attackers import OP_PING, connect_ws, flood_process, rst_close, text
from tests.support.procs import metric

from .measure import Sampler, baseline_gap, cpu_seconds, edge_errors, neighbour, rss_mb

pytestmark = pytest.mark.integration

ALL_SYMBOLS = sorted(PAIRS)


@dataclass
class PingFlood:
    """A key-less client sends pings for `seconds` and never reads; what it cost."""

    seconds: float
    sent: int
    rss_growth_mb: float
    cpu_s: float  # the edge's CPU time meanwhile
    gap_s: float  # the neighbour's worst tick-to-tick gap meanwhile
    baseline_s: float

    def __str__(self) -> str:
        return (f"ping flood, never reading, {self.seconds:.0f} s: sent {self.sent} B; edge RSS "
                f"+{self.rss_growth_mb:.1f} MB; edge CPU {self.cpu_s:.2f} s; neighbour's worst gap "
                f"{self.gap_s * 1000:.0f} ms (baseline {self.baseline_s * 1000:.0f} ms)")


async def ping_flood_never_reading(cluster: Cluster, seconds: float = 8.0) -> PingFlood:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc, port = cluster.edge()
    pid = proc.proc.pid
    async with neighbour(port, cluster.redis_url) as good:
        baseline = await baseline_gap(good)
        before, cpu = rss_mb(pid), cpu_seconds(pid)
        sampler = Sampler(pid, port, every=0.2, health=False).start()
        async with flood_process(port, OP_PING, 1 << 30, 1, seconds=seconds, read=False,
                                 rcvbuf=4096) as attack:
            await attack.go()
            reports = await attack.results(timeout=seconds + 10)
        cpu = cpu_seconds(pid) - cpu
        gap = good.worst_gap(attack.started, time.monotonic())
        await sampler.stop()
        assert proc.alive()
        good.assert_contiguous()
    assert not edge_errors(proc.log)
    result = PingFlood(seconds, reports[0].sent, sampler.peak_rss - before, cpu, gap, baseline)
    print(f"\n{result}")
    return result


async def test_keyless_client_sending_pings_and_never_reading_grows_edge_under_20mb(
    cluster: Cluster,
) -> None:
    flood = await ping_flood_never_reading(cluster)
    assert flood.rss_growth_mb < 20.0


async def test_closed_client_that_keeps_sending_pings_and_never_reads_does_not_pin_edge_cpu(
    cluster: Cluster,
) -> None:
    # Closing it takes ~40 frames; after that its bytes should cost nothing but the discard.
    flood = await ping_flood_never_reading(cluster)
    assert flood.cpu_s < 0.25 * flood.seconds


async def test_100_nonreading_clients_asking_full_replays_stay_within_write_buffers(
    cluster: Cluster,
) -> None:
    connections = 100
    write_buffer = 256 * 1024  # the default FXPROXY_WRITE_BUFFER
    # Per connection the edge may hold the writer's queue (one budget), the transport's buffer
    # (up to the high-water mark = one budget) and one write that crosses it (one more budget).
    held = 3 * write_buffer * connections
    slack = 20 * 1024 * 1024  # allocator, redis replies in flight, metrics
    bound_mb = (held + slack) / 2**20
    cluster.simfeed(rate=200)
    cluster.ingestor(symbols=",".join(ALL_SYMBOLS))
    proc, port = cluster.edge(FXPROXY_HANDSHAKE_RATE="1000", FXPROXY_HANDSHAKE_BURST="1000")
    pid = proc.proc.pid
    r = aioredis.Redis.from_url(cluster.redis_url)
    try:  # let history fill (FXPROXY_HISTORY_LEN, 1000) so `since: 0` asks for the most it can
        deadline = time.monotonic() + 15
        while min([await r.xlen(f"fx:hist:{s}") for s in ALL_SYMBOLS]) < 1000:
            assert time.monotonic() < deadline, "history did not grow"
            await asyncio.sleep(0.2)
        depth = min([await r.xlen(f"fx:hist:{s}") for s in ALL_SYMBOLS])
    finally:
        await r.aclose()
    subscribe = text({"op": "subscribe", "symbols": ALL_SYMBOLS, "since": dict.fromkeys(ALL_SYMBOLS, 0)})
    unsubscribe = text({"op": "unsubscribe", "symbols": ALL_SYMBOLS})

    def attack(stop_at: float) -> int:
        """Subscribe with since 0 / unsubscribe, over and over, never reading; reconnect when cut."""
        sent = 0
        for _ in range(50):  # reconnects
            if time.monotonic() >= stop_at:
                break
            try:
                client = connect_ws(port, key=API_KEY, rcvbuf=4096)
            except OSError:
                time.sleep(0.1)
                continue
            client.sock.settimeout(0.5)
            try:
                for i in range(10_000):
                    if time.monotonic() >= stop_at:
                        break
                    client.send(subscribe if i % 2 == 0 else unsubscribe)
                    sent += 1
                    time.sleep(0.1)  # within FXPROXY_OP_RATE: every request is served
            except OSError:
                pass
            finally:
                rst_close(client.sock)
        return sent

    async with neighbour(port, cluster.redis_url) as good:
        await asyncio.sleep(0.5)
        before = rss_mb(pid)
        sampler = Sampler(pid, port, every=0.2, health=False).start()
        stop_at = time.monotonic() + 8
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=connections) as pool:  # all of them at once
            sent = await asyncio.gather(*(loop.run_in_executor(pool, attack, stop_at)
                                          for _ in range(connections)))
        await sampler.stop()
        growth = sampler.peak_rss - before
        closed_1013 = metric(port, 'fxproxy_edge_closed_total{code="1013"}', 0)
        print(f"\n{connections} non-reading clients, {sum(sent)} subscribe/unsubscribe frames "
              f"(since 0 over {depth}+ ticks x {len(ALL_SYMBOLS)} symbols): edge RSS {before:.1f} -> "
              f"peak {sampler.peak_rss:.1f} MB (+{growth:.1f} MB, bound {bound_mb:.1f} MB); "
              f"closed 1013: {closed_1013:.0f}")
        assert growth < bound_mb
        good.assert_contiguous()
    assert not edge_errors(proc.log)
