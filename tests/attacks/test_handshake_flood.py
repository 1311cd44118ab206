"""Upgrade requests in progress are capped in bytes; hundreds of slow ones cost bounded memory.

Issue 8: each handshake in progress could park 128 x 8 KiB of headers for 10 s; 500 key-less
connections took an edge from ~50 to 625 MB, not returned afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from tests.conftest import Cluster
from tests.support.attackers import partial_upgrade
from tests.support.procs import metric

from .measure import Sampler, edge_errors, neighbour, rss_mb

pytestmark = pytest.mark.integration

SLOW = 500  # connections holding an unfinished upgrade request
HEADER_BYTES = 15 * 1024  # each, under FXPROXY_MAX_HANDSHAKE_BYTES (16 KiB)
MAX_HANDSHAKE_BYTES = 16 * 1024
PER_CONNECTION = MAX_HANDSHAKE_BYTES + 16 * 1024  # its request bytes + the edge's own state for it
BOUND_MB = (SLOW * PER_CONNECTION + 10 * 2**20) / 2**20  # + 10 MB slack: 25.6 MB


def _dribble(socks: list[socket.socket]) -> int:
    """One more header byte on each connection (a slowloris keeps its request alive); the number
    still open."""
    alive = 0
    for s in socks:
        try:
            s.send(b"a")
            alive += 1
        except OSError:
            pass
    return alive


def _ended(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed or reset the connection (within `timeout`)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def test_500_slow_upgrade_requests_cost_bounded_memory_and_oversized_ones_are_cut(
    cluster: Cluster,
) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc, port = cluster.edge(FXPROXY_HANDSHAKE_TIMEOUT="15")
    pid = proc.proc.pid
    socks: list[socket.socket] = []
    async with neighbour(port, cluster.redis_url) as good:
        try:
            await asyncio.sleep(0.5)
            before = rss_mb(pid)
            sampler = Sampler(pid, port, every=0.2).start()
            for _ in range(SLOW // 50):
                socks += await asyncio.to_thread(
                    lambda: [partial_upgrade(port, HEADER_BYTES) for _ in range(50)])
            opened = time.monotonic()
            pending = metric(port, "fxproxy_edge_handshakes_pending")
            alive = 0
            for _ in range(10):  # hold them 5 s, a byte at a time
                await asyncio.sleep(0.5)
                alive = await asyncio.to_thread(_dribble, socks)
            held = time.monotonic() - opened
            # Oversized: one byte over the cap is cut at once.
            big = [await asyncio.to_thread(partial_upgrade, port, MAX_HANDSHAKE_BYTES + 1) for _ in range(5)]
            cut = [await asyncio.to_thread(_ended, s, 2.0) for s in big]
            for s in big:
                s.close()
            await sampler.stop()
            peak = sampler.peak_rss
            for s in socks:
                s.close()
            socks.clear()
            await asyncio.sleep(2)  # after they are gone
            after = [rss_mb(pid)]
            for _ in range(10):
                await asyncio.sleep(0.2)
                after.append(rss_mb(pid))
            print(f"\n{SLOW} slow upgrade requests of {HEADER_BYTES} B held {held:.1f} s ({alive} still "
                  f"open, edge counts {pending:.0f} pending): edge RSS {before:.1f} -> peak {peak:.1f} MB "
                  f"(+{peak - before:.1f} MB, bound {BOUND_MB:.1f} MB); after they closed "
                  f"{after[0]:.1f} -> {after[-1]:.1f} MB; /healthz worst "
                  f"{sampler.worst_healthz * 1000:.0f} ms; "
                  f"oversized requests cut: {sum(cut)}/{len(cut)}")
            assert alive == SLOW, "the edge dropped slow handshakes before their timeout"
            assert pending >= SLOW
            assert peak - before < BOUND_MB
            assert all(cut), "an upgrade request over 16 KiB was not cut"
            assert max(after) <= peak + 1, "RSS kept growing after the connections closed"
            assert after[-1] <= after[0] + 0.5
            good.assert_contiguous()
        finally:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
    assert not edge_errors(proc.log)
