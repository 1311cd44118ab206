"""Clients through the shipped nginx config to several edge processes, as deployed."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import API_KEY, Cluster
from tests.support.client import live_ticks, open_native, recv_json, send_json
from tests.support.nginx import run_nginx
from tests.support.procs import metric
from tests.support.tail import assert_resumed_once_without_a_gap, tail_through_a_kill

pytestmark = pytest.mark.integration


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_both_dialects_flow_through_nginx_and_metrics_stay_private(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    ports = [cluster.edge()[1], cluster.edge()[1]]
    await asyncio.sleep(1)
    with run_nginx(ports) as port:
        base = f"127.0.0.1:{port}"
        assert await asyncio.to_thread(http_status, f"http://{base}/readyz") == 200
        assert await asyncio.to_thread(http_status, f"http://{base}/metrics") == 404
        async with await open_native(port, API_KEY) as ws:
            await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
            assert (await recv_json(ws))["type"] == "subscribed"
            assert len(await live_ticks(ws, 5)) == 5
        async with connect(f"ws://{base}/feedadv") as tm:
            assert await tm.recv() == "Connected"
            await tm.send(orjson.dumps({"userKey": API_KEY, "symbol": "GBPUSD"}).decode())
            assert orjson.loads(await tm.recv())["symbol"] == "GBPUSD"


async def test_draining_edge_sends_clients_through_nginx_to_another_edge(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    edge1, port1 = cluster.edge(FXPROXY_DRAIN_TIMEOUT="0.5")
    _, port2 = cluster.edge(FXPROXY_DRAIN_TIMEOUT="0.5")
    await asyncio.sleep(1)
    with run_nginx([port1, port2]) as port:
        clients = [await open_native(port, API_KEY) for _ in range(6)]
        for ws in clients:
            await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
            await live_ticks(ws, 1)
        edge1.terminate()  # SIGTERM: readyz fails, clients get 1001, the process exits
        codes = []
        for ws in clients:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await asyncio.wait_for(live_ticks(ws, 40, timeout=3), 3)
            codes.append(ws.close_code)
        assert 1001 in codes, "some clients were on the drained edge"
        assert edge1.proc.returncode == 0
        async with await open_native(port, API_KEY) as again:  # nginx skips the dead edge
            await send_json(again, {"op": "subscribe", "symbols": ["EURUSD"]})
            assert len(await live_ticks(again, 3)) == 3
        for ws in clients:
            await ws.close()


def test_tail_json_behind_nginx_survives_a_kill_of_its_edge_without_a_gap(cluster: Cluster) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    edges = [cluster.edge(), cluster.edge()]

    def kill_its_edge() -> None:  # the one nginx chose for it
        next(proc for proc, p in edges if metric(p, "fxproxy_edge_connections", 0.0) >= 1).kill()

    with run_nginx([port for _, port in edges]) as port:
        events = tail_through_a_kill([f"ws://127.0.0.1:{port}/v1/stream"], kill_its_edge)
    assert_resumed_once_without_a_gap(events)
