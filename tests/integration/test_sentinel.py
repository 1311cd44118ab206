"""The whole pipeline on a Sentinel-managed primary (2 replicas, 3 real redis-sentinel processes),
through the CLI: ingestors and edges follow a failover, and clients see no silent gap."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import SYMBOLS, StartProc
from tests.conftest import Cluster as Pipeline
from tests.support.bus_rig import BusRig
from tests.support.redis_sentinel import RedisSentinel

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _failover_under_witnesses(procs: StartProc, sentinel: RedisSentinel, how: str) -> None:
    rig = BusRig(Pipeline(procs, sentinel.url), SYMBOLS.split(","))
    try:
        await rig.start(rate=20)
        old = sentinel.primary()
        fault_at = time.monotonic()
        if how == "kill":
            sentinel.kill(old)
        else:
            sentinel.failover()
        promoted = await asyncio.to_thread(sentinel.wait_new_primary, old, 30)
        result = await rig.measure(fault_at)
        print(f"\n{result.line(f'sentinel {how}')}; sentinels named :{sentinel.primary()} "
              f"(was :{old}) after {promoted:.2f}s")
        assert result.silent_gaps == 0 and result.duplicates == 0, result.findings
        assert result.flow < 15.0, result.findings
    finally:
        await rig.stop()


async def test_primary_killed_ingestors_and_edges_follow_the_new_primary_without_silent_gaps(
        procs: StartProc, redis_sentinel: RedisSentinel) -> None:
    await _failover_under_witnesses(procs, redis_sentinel, "kill")


async def test_sentinel_failover_is_followed_without_silent_gaps(
        procs: StartProc, redis_sentinel: RedisSentinel) -> None:
    await _failover_under_witnesses(procs, redis_sentinel, "failover")
