"""Control frames cost like any frame: a key-less flood of pings or pongs is cut off at once and
does not stall the edge for anyone else (issue 8: 3 MB of pongs on one connection stalled every
client for 2.5 s, ten connections for 11 s).

The attackers run in a process of their own, so they never share a GIL with the neighbour we time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import Cluster
from tests.support.attackers import OP_PING, OP_PONG, flood_process

from .measure import Sampler, baseline_gap, cpu_seconds, edge_errors, neighbour, rss_mb

pytestmark = pytest.mark.integration

FLOOD_BYTES = 3_000_000  # per attacking connection: 500,000 empty masked frames of 6 bytes
GAP_BOUND = 0.050  # s the neighbour's worst tick-to-tick gap may grow over its baseline (~20 ms)
# Ten flooders: the edge spends under 0.1 s of CPU on all of them (printed), but on this 2-core
# machine the attacker process pushing 30 MB competes for the cores the neighbour, feed and
# ingestor run on, so the end-to-end gap carries that noise too.
GAP_BOUND_10 = 0.100
EDGE_CPU_BOUND = 0.25  # s of edge CPU for the whole flood: the edge's own share of the cost
HEALTHZ_BOUND = 0.100  # s for /healthz to answer during the flood
CLOSED_BOUND = 1.0  # s from the flood's first byte to the attacker's 1008 (or its TCP close)
# A closed client gets CLOSE_TIMEOUT (2 s) to answer, then FIN, then 2 x ping interval to go.
TCP_END_BOUND = 2.0 + 2 * 1.0 + 1.0
EDGE_ENV = {"FXPROXY_PING_INTERVAL": "1", "FXPROXY_HANDSHAKE_RATE": "1000",
            "FXPROXY_HANDSHAKE_BURST": "1000"}

@pytest.mark.parametrize(("opcode", "connections"), [
    pytest.param(OP_PONG, 1, id="pongs-1"),
    pytest.param(OP_PING, 1, id="pings-1"),
    pytest.param(OP_PONG, 10, id="pongs-10"),
    pytest.param(OP_PING, 10, id="pings-10"),
])
async def test_keyless_control_frame_flood_is_closed_and_costs_neighbour_under_50ms(
    cluster: Cluster, opcode: int, connections: int,
) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc, port = cluster.edge(**EDGE_ENV)
    pid = proc.proc.pid
    async with neighbour(port, cluster.redis_url) as good:
        baseline = await baseline_gap(good)
        # Connected right before the flood: the edge reaps a client silent for 2 ping intervals.
        async with flood_process(port, opcode, FLOOD_BYTES, connections) as attack:
            rss_before, cpu_before = rss_mb(pid), cpu_seconds(pid)
            sampler = Sampler(pid, port).start()
            await attack.go()
            t0 = attack.started
            reports = await attack.results(timeout=20)
            t1 = time.monotonic()
            cpu = cpu_seconds(pid) - cpu_before
            await sampler.stop()
        await asyncio.sleep(0.3)  # ticks due by t1 arrive
        worst = good.worst_gap(t0, t1)
        kind = "pong" if opcode == OP_PONG else "ping"
        print(f"\n{connections} x {FLOOD_BYTES} B {kind} flood: neighbour's worst gap "
              f"{worst * 1000:.1f} ms (baseline {baseline * 1000:.1f} ms), worst feed-to-neighbour "
              f"latency {good.latency(t0, t1) * 1000:.1f} ms; /healthz worst "
              f"{sampler.worst_healthz * 1000:.1f} ms ({len(sampler.healthz)} probes); edge CPU "
              f"{cpu:.2f} s in {t1 - t0:.2f} s; RSS {rss_before:.1f} -> peak {sampler.peak_rss:.1f} MB")
        for r in reports:
            print(f"  sent {r.sent} B; close {r.close_code} after {r.close_after}; TCP end after "
                  f"{r.eof_after} (reset: {r.reset})")
        for r in reports:
            assert r.close_code in (1008, None), r.close_code
            ended = min((t for t in (r.close_after, r.eof_after) if t is not None), default=None)
            assert ended is not None and ended < CLOSED_BOUND, f"attacker not cut off: {r}"
            assert r.eof_after is not None and r.eof_after < TCP_END_BOUND, f"attacker lingers: {r}"
        assert cpu < EDGE_CPU_BOUND, f"the edge spent {cpu:.2f} s of CPU on the flood"
        bound = GAP_BOUND if connections == 1 else GAP_BOUND_10
        assert worst < baseline + bound, (
            f"neighbour's worst gap {worst * 1000:.0f} ms vs baseline {baseline * 1000:.0f} ms")
        assert sampler.worst_healthz < HEALTHZ_BOUND, (
            f"/healthz took {sampler.worst_healthz * 1000:.0f} ms; errors {sampler.health_errors[:3]}")
        assert not sampler.health_errors
        good.assert_contiguous()
    assert not edge_errors(proc.log)
