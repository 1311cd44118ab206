"""The whole pipeline as separate processes: simfeed -> ingestor -> Redis -> edge -> client."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import API_KEY, Cluster
from tests.support.client import assert_no_gaps, live_ticks, open_native, recv_json, send_json, until

pytestmark = pytest.mark.integration


async def test_ticks_flow_from_feed_to_native_client(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    _, port = cluster.edge()
    async with await open_native(port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"], "id": 7})
        reply = await until(ws, lambda m: m.get("type") in ("subscribed", "error"), timeout=10)
        if reply["type"] == "error":  # the first tick may not be in Redis yet
            await asyncio.sleep(1)
            await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"], "id": 7})
            reply = await until(ws, lambda m: m.get("type") == "subscribed")
        assert reply == {"type": "subscribed", "id": 7, "symbols": ["EURUSD", "GBPUSD"]}
        ticks = await live_ticks(ws, 20)
    assert {t["symbol"] for t in ticks} == {"EURUSD", "GBPUSD"}
    for t in ticks:
        assert t["bid"] < t["ask"]
        assert isinstance(t["ts"], int) and isinstance(t["seq"], int)
    assert_no_gaps(ticks)


async def test_ticks_flow_to_unmodified_tradermade_client(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    _, port = cluster.edge()
    await asyncio.sleep(0.5)
    async with connect(f"ws://127.0.0.1:{port}/feedadv", open_timeout=5) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "Connected"
        await ws.send(orjson.dumps({"userKey": API_KEY, "symbol": "EURUSD,USDJPY"}).decode())
        got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(10)]
    for tick in got:
        assert set(tick) == {"symbol", "ts", "bid", "ask", "mid"}
        assert tick["symbol"] in ("EURUSD", "USDJPY")
        assert isinstance(tick["ts"], str) and tick["ts"].isdigit()


async def test_bad_key_is_refused_with_401_before_upgrade(cluster: Cluster) -> None:
    _, port = cluster.edge()
    with pytest.raises(InvalidStatus) as info:
        await open_native(port, "not-a-key")
    assert info.value.response.status_code == 401


async def test_unknown_symbol_gets_error_frame_and_connection_stays(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    _, port = cluster.edge()
    await asyncio.sleep(1)
    async with await open_native(port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["ZZZYYY"], "id": 3})
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == "unknown_symbol" and err["id"] == 3
        assert err["symbols"] == ["ZZZYYY"]
        await send_json(ws, {"op": "ping", "id": 4})
        assert await recv_json(ws) == {"type": "pong", "id": 4}


async def test_subscribe_sends_snapshot_of_last_tick_first(cluster: Cluster) -> None:
    cluster.simfeed(rate=2)
    cluster.ingestor()
    _, port = cluster.edge()
    await asyncio.sleep(1.5)
    client = aioredis.Redis.from_url(cluster.redis_url)
    stored = orjson.loads(await client.hget("fx:last", "EURUSD"))
    await client.aclose()
    async with await open_native(port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
        assert (await recv_json(ws))["type"] == "subscribed"
        snap = await recv_json(ws)
        assert snap["snapshot"] is True and snap["symbol"] == "EURUSD"
        assert snap["seq"] >= stored["seq"]
        nxt = (await live_ticks(ws, 1))[0]
        assert nxt["seq"] == snap["seq"] + 1


async def test_two_edges_deliver_every_tick_in_order_without_gaps(cluster: Cluster) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    _, port1 = cluster.edge()
    _, port2 = cluster.edge()
    await asyncio.sleep(1)
    symbols = ["EURUSD", "GBPUSD", "USDJPY"]
    async with await open_native(port1, API_KEY) as a, await open_native(port2, API_KEY) as b:
        for ws in (a, b):
            await send_json(ws, {"op": "subscribe", "symbols": symbols})
        got_a, got_b = await asyncio.gather(live_ticks(a, 150, 15), live_ticks(b, 150, 15))
    assert_no_gaps(got_a)
    assert_no_gaps(got_b)
    # Both edges relay the same ticks: where their seq ranges overlap, the payloads agree.
    by_a = {(t["symbol"], t["seq"]): t for t in got_a}
    common = [t for t in got_b if (t["symbol"], t["seq"]) in by_a]
    assert len(common) > 50
    assert all(by_a[(t["symbol"], t["seq"])] == t for t in common)


async def test_ingestor_reconnects_when_upstream_drops_and_ticks_resume(cluster: Cluster) -> None:
    feed = cluster.simfeed()
    cluster.ingestor()
    _, port = cluster.edge()
    await asyncio.sleep(1)
    async with await open_native(port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
        before = await live_ticks(ws, 5)
        feed.kill()  # the vendor goes away mid-stream
        await asyncio.sleep(1.0)
        cluster.simfeed(port=cluster.feed_port)  # and comes back on the same address
        after = await live_ticks(ws, 5, timeout=15)
    assert after[0]["seq"] > before[-1]["seq"]
    assert_no_gaps(before + after)  # seq continues across the reconnect
