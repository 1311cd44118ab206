"""The client library against real processes: it survives an edge kill, and stops on revocation."""

from __future__ import annotations

import asyncio
import time

import pytest

from fxproxy.client import Anomaly, Client, Revoked, State, Subscribed, Tick
from tests.conftest import API_KEY, Cluster
from tests.integration.test_keys_cluster import create_key, keys_cli

pytestmark = pytest.mark.integration

RECONNECT_BOUND = 1.5  # seconds from the kill to the first resumed tick (README: edge kill ≤ 1.5 s)


async def test_client_resumes_on_the_other_edge_after_a_kill_with_no_gap(cluster: Cluster) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc1, port1 = cluster.edge()
    _, port2 = cluster.edge()
    urls = [f"ws://127.0.0.1:{port1}/v1/stream", f"ws://127.0.0.1:{port2}/v1/stream"]
    ticks: list[Tick] = []
    states: list[State] = []
    resumed: list[Subscribed] = []
    anomalies: list[Anomaly] = []
    killed_at = resumed_at = 0.0
    async with asyncio.timeout(30), Client(urls, API_KEY, ["EURUSD", "GBPUSD"]) as client:
        async for event in client:
            if isinstance(event, Tick):
                ticks.append(event)
                if killed_at and not resumed_at and client.reconnects:
                    resumed_at = time.monotonic()
                if not killed_at and len(ticks) >= 20:
                    proc1.kill()
                    killed_at = time.monotonic()
                if resumed_at and len(ticks) >= 60:
                    break
            elif isinstance(event, State):
                states.append(event)
            elif isinstance(event, Subscribed) and event.recovered:
                resumed.append(event)
            elif isinstance(event, Anomaly):
                anomalies.append(event)
    assert anomalies == [] and client.positions.anomalies == 0
    assert [r.recovered for r in resumed] == [{"EURUSD": True, "GBPUSD": True}]
    assert [s.state for s in states].count("reconnecting") == 1
    for symbol in ("EURUSD", "GBPUSD"):
        seqs = [t.seq for t in ticks if t.symbol == symbol and t.seq is not None]
        assert len(seqs) > 10
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{symbol}: {seqs}"
    took = resumed_at - killed_at
    print(f"reconnect: first resumed tick {took * 1000:.0f} ms after the kill")
    assert 0 < took < RECONNECT_BOUND


async def test_revoked_key_stops_the_client_with_revoked(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    key = create_key(cluster.redis_url, "hank")
    _, port = cluster.edge()
    seen = 0
    with pytest.raises(Revoked):
        async with asyncio.timeout(15), Client(f"ws://127.0.0.1:{port}/v1/stream", key, ["EURUSD"]) as c:
            async for event in c:
                if isinstance(event, Tick):
                    seen += 1
                    if seen == 3:
                        assert keys_cli(cluster.redis_url, "revoke", "hank").returncode == 0
    assert seen >= 3 and c.reconnects == 0


async def test_drained_edge_1001_means_reconnect_at_once_with_the_auth_frame_path(cluster: Cluster) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc1, port1 = cluster.edge(FXPROXY_DRAIN_TIMEOUT="0.5")
    _, port2 = cluster.edge()
    urls = [f"ws://127.0.0.1:{port1}/v1/stream", f"ws://127.0.0.1:{port2}/v1/stream"]
    reconnecting: list[State] = []
    recovered: list[dict[str, bool]] = []
    seen = 0
    async with asyncio.timeout(30), Client(urls, API_KEY, ["EURUSD"], auth="frame") as client:
        async for event in client:
            if isinstance(event, Tick):
                seen += 1
                if seen == 10:
                    proc1.terminate()
                if recovered and seen >= 40:
                    break
            elif isinstance(event, State) and event.state == "reconnecting":
                reconnecting.append(event)
            elif isinstance(event, Subscribed) and event.recovered:
                recovered.append(event.recovered)
    assert [(s.delay, s.reason) for s in reconnecting] == [(0.0, reconnecting[0].reason)]
    assert "1001" in reconnecting[0].reason
    assert recovered == [{"EURUSD": True}] and client.positions.anomalies == 0
