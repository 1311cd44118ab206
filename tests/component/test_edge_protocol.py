"""Client protocol against a live in-process edge: subscribe, snapshot, replay, dialects."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from websockets.asyncio.client import connect

from shared.bus import Message
from shared.keystore import key_changed_event
from shared.tick import Tick, encode_tick
from tests.component.conftest import STATIC_KEY, Edge
from tests.support.client import live_ticks, open_native, recv_json, send_json, until


async def test_subscribe_gets_reply_then_snapshot_then_live_ticks(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "id": 1})
        assert await recv_json(ws) == {"type": "subscribed", "id": 1, "symbols": ["EURUSD"]}
        snap = await recv_json(ws)
        assert snap["snapshot"] is True and snap["seq"] == 1
        await edge.tick("EURUSD", 3)
        assert [t["seq"] for t in await live_ticks(ws, 3)] == [2, 3, 4]


async def test_unsubscribe_stops_ticks_and_ping_answers(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"]})
        await recv_json(ws)
        await recv_json(ws)
        await recv_json(ws)  # reply and two snapshots
        await send_json(ws, {"op": "unsubscribe", "symbols": ["GBPUSD"], "id": 2})
        assert await recv_json(ws) == {"type": "unsubscribed", "id": 2, "symbols": ["GBPUSD"]}
        await edge.tick("GBPUSD")
        await edge.tick("EURUSD")
        assert (await recv_json(ws))["symbol"] == "EURUSD"
        await send_json(ws, {"op": "ping", "id": 3})
        assert await recv_json(ws) == {"type": "pong", "id": 3}


async def test_since_replays_missed_ticks_instead_of_snapshot(edge: Edge) -> None:
    await edge.tick("EURUSD", 5)  # seqs 2..6
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "since": {"EURUSD": 3}})
        assert (await recv_json(ws))["type"] == "subscribed"
        replay = [await recv_json(ws) for _ in range(3)]
        assert [t["seq"] for t in replay] == [4, 5, 6]
        assert not any(t.get("snapshot") for t in replay)


async def test_hub_subscribes_bus_once_per_symbol_and_releases_with_last_client(edge: Edge) -> None:
    subscriber = edge.bus.subscribers[0]
    async with await open_native(edge.port, STATIC_KEY) as a, await open_native(edge.port, STATIC_KEY) as b:
        for ws in (a, b):
            await send_json(ws, {"op": "subscribe", "symbols": ["USDJPY"]})
            await recv_json(ws)
        assert "USDJPY" in subscriber.symbols
        await a.close()
        await asyncio.sleep(0.1)
        assert "USDJPY" in subscriber.symbols  # b still holds it
    await asyncio.sleep(0.1)
    assert "USDJPY" not in subscriber.symbols


async def test_tradermade_client_gets_connected_then_ticks_in_its_shape(edge: Edge) -> None:
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        assert await ws.recv() == "Connected"
        await ws.send(orjson.dumps({"userKey": STATIC_KEY, "symbol": "EURUSD"}).decode())
        first = orjson.loads(await ws.recv())  # last known price
        await edge.tick("EURUSD")
        live = orjson.loads(await ws.recv())
    assert first["symbol"] == live["symbol"] == "EURUSD"
    assert set(live) == {"symbol", "ts", "bid", "ask", "mid"} and isinstance(live["ts"], str)


async def test_tradermade_relogin_replaces_the_symbol_set(edge: Edge) -> None:
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        await ws.recv()
        await ws.send(orjson.dumps({"userKey": STATIC_KEY, "symbol": "EURUSD"}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"userKey": STATIC_KEY, "symbol": "GBPUSD"}).decode())
        assert orjson.loads(await ws.recv())["symbol"] == "GBPUSD"
        await edge.tick("EURUSD")
        await edge.tick("GBPUSD")
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 2))["symbol"] == "GBPUSD"


async def test_health_ready_and_metrics_endpoints(edge: Edge) -> None:
    import urllib.request

    def get(path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{edge.port}{path}", timeout=2) as resp:
            return resp.status, resp.read()

    assert await asyncio.to_thread(get, "/healthz") == (200, b"ok\n")
    assert await asyncio.to_thread(get, "/readyz") == (200, b"ready\n")
    status, body = await asyncio.to_thread(get, "/metrics")
    assert status == 200 and b"fxproxy_edge_connections" in body


async def test_drain_fails_readiness_and_closes_clients_with_1001(edge: Edge) -> None:
    import urllib.error
    import urllib.request

    async with await open_native(edge.port, STATIC_KEY) as ws:
        drain = asyncio.create_task(edge.app.server.drain(0.2))
        await asyncio.sleep(0.05)
        try:
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{edge.port}/readyz")
            raise AssertionError("readyz should fail while draining")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        await asyncio.wait_for(ws.wait_closed(), 3)
        await drain
    assert ws.close_code == 1001



async def test_client_leaving_mid_subscribe_leaves_no_bus_subscription_behind() -> None:
    from collections.abc import Collection

    from edge.app import EdgeApp
    from shared.memory_bus import MemoryBus, MemorySubscriber
    from shared.settings import EdgeSettings

    class SlowSubscriber(MemorySubscriber):
        async def unsubscribe(self, symbols: Collection[str]) -> None:
            await asyncio.sleep(0.2)  # Redis is slow to answer while the client hangs up
            await super().unsubscribe(symbols)

    class SlowBus(MemoryBus):
        def subscriber(self, on_tick, on_control, on_state, *_):  # type: ignore[no-untyped-def]
            return SlowSubscriber(self, on_tick, on_control, on_state)

    bus = SlowBus()
    await bus.publish([Message("EURUSD", 1, encode_tick(Tick("EURUSD", 1.1, 1.2, 1.15, 1, "e1", 1)))])
    app = EdgeApp(EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY]), bus, None)
    port = await app.start()
    try:
        ws = await open_native(port, STATIC_KEY)
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "NOSUCH"]})
        await asyncio.sleep(0.05)  # now inside the release of NOSUCH
        await ws.close()
        await asyncio.sleep(0.6)
        assert app.server.hub.symbols() == set()
        assert bus.subscribers[0].symbols == set()
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()


async def test_max_rate_conflates_to_the_latest_tick_and_says_what_was_granted(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "max_rate": 5, "id": 1})
        reply = await recv_json(ws)
        assert reply["max_rate"] == {"EURUSD": 5.0}
        await recv_json(ws)  # snapshot
        for _ in range(5):
            await edge.tick("EURUSD", 20)  # 100 ticks in ~0.2 s
            await asyncio.sleep(0.04)
        await asyncio.sleep(0.3)
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(await recv_json(ws, timeout=0.3))
    assert 1 <= len(got) <= 4, len(got)  # ~0.5 s of ticks at 5/s
    assert got[-1]["seq"] == 101  # the latest always arrives
    assert all(t["conflated"] for t in got[1:])


async def test_a_keys_max_rate_caps_what_its_clients_get_live(edge: Edge) -> None:
    await edge.add_key("free-key", "free", max_rate=1.0)
    async with await open_native(edge.port, "free-key") as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"], "max_rate": 50})
        assert (await recv_json(ws))["max_rate"] == {"EURUSD": 1.0, "GBPUSD": 1.0}
        await send_json(ws, {"op": "unsubscribe", "symbols": ["GBPUSD"]})
        await until(ws, lambda m: m["type"] == "unsubscribed")
        await send_json(ws, {"op": "subscribe", "symbols": ["GBPUSD"]})  # asks for no limit
        assert (await until(ws, lambda m: m["type"] == "subscribed"))["max_rate"] == {"GBPUSD": 1.0}
        await recv_json(ws)
        key_hash = await edge.store.update("free", max_rate=0.0)  # upgraded: unthrottled
        assert key_hash is not None
        await edge.bus.publish_control(key_changed_event(key_hash))
        await asyncio.sleep(0.05)
        await edge.tick("GBPUSD", 5)
        assert [t["seq"] for t in await live_ticks(ws, 5)] == [2, 3, 4, 5, 6]
