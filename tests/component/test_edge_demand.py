"""Symbols on demand at a live in-process edge: pending subscriptions, first ticks, refusals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from edge.app import EdgeApp
from shared.bus import Message
from shared.demand import Catalog, MemoryDemandStore, symbol_status_event
from shared.keystore import MemoryKeyStore
from shared.memory_bus import MemoryBus
from shared.settings import EdgeSettings
from shared.tick import Tick, encode_tick
from tests.component.conftest import STATIC_KEY
from tests.support.client import open_native, recv_json, send_json, until


class DemandEdge:
    def __init__(self, app: EdgeApp, bus: MemoryBus, demand: MemoryDemandStore, port: int) -> None:
        self.app, self.bus, self.demand, self.port = app, bus, demand, port

    async def tick(self, symbol: str, seq: int, epoch: str = "e1") -> None:
        tick = Tick(symbol, 1.1, 1.2, 1.15, 1732186000000 + seq, epoch, seq)
        await self.bus.publish([Message(symbol, seq, encode_tick(tick))])

    async def wanted(self) -> set[str]:
        return await self.demand.union()

    async def until_wanted(self, pred: Any, timeout: float = 2.0) -> float:
        """Seconds until the edge's published demand satisfies `pred`."""
        started = time.monotonic()
        while not pred(await self.wanted()):
            assert time.monotonic() - started < timeout, f"demand is {await self.wanted()}"
            await asyncio.sleep(0.005)
        return time.monotonic() - started


@pytest.fixture
async def edge() -> AsyncIterator[DemandEdge]:
    """An edge whose catalogue is EURUSD (static, has ticked) and the globs XAU*, USD???."""
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console")
    bus, demand = MemoryBus(), MemoryDemandStore()
    await demand.write_catalog(Catalog(("EURUSD",), ("XAU*", "USD???")))
    app = EdgeApp(settings, bus, MemoryKeyStore(), demand)
    edge = DemandEdge(app, bus, demand, await app.start())
    await edge.tick("EURUSD", 1)
    yield edge
    await app.stop(drain_timeout=0)
    await bus.close()


async def test_a_symbol_nobody_streams_is_pending_then_its_first_tick_arrives_live(edge: DemandEdge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "XAUUSD"], "id": 1})
        assert await recv_json(ws) == {"type": "subscribed", "id": 1, "symbols": ["EURUSD", "XAUUSD"],
                                       "pending": ["XAUUSD"]}
        assert (await recv_json(ws))["snapshot"] is True  # EURUSD only: XAUUSD has nothing yet
        took = await edge.until_wanted(lambda w: "XAUUSD" in w)
        print(f"\ndemand published {took * 1000:.0f} ms after subscribe (debounce 50 ms)")
        assert took < 1.0
        # The new leader's numbering may start anywhere: the first tick is no gap, no reset.
        for seq in (41, 42, 43):
            await edge.tick("XAUUSD", seq)
        got = [await recv_json(ws) for _ in range(3)]
        assert [(m["type"], m["symbol"], m["seq"], m.get("snapshot")) for m in got] == [
            ("tick", "XAUUSD", 41, None), ("tick", "XAUUSD", 42, None), ("tick", "XAUUSD", 43, None)]
        # A second client now gets a snapshot, like for any streamed symbol.
        async with await open_native(edge.port, STATIC_KEY) as other:
            await send_json(other, {"op": "subscribe", "symbols": ["XAUUSD"]})
            assert "pending" not in await recv_json(other)
            snap = await recv_json(other)
            assert snap["snapshot"] is True and snap["seq"] == 43
        await send_json(ws, {"op": "unsubscribe", "symbols": ["XAUUSD"]})
        await until(ws, lambda m: m["type"] == "unsubscribed")
        took = await edge.until_wanted(lambda w: "XAUUSD" not in w)
        assert took < 1.0


async def test_symbols_outside_the_catalogue_are_unknown_and_never_asked_for(edge: DemandEdge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["GBPJPY", "XAUUSD"], "id": 2})
        error = await recv_json(ws)
        assert (error["code"], error["symbols"]) == ("unknown_symbol", ["GBPJPY"])
        reply = await recv_json(ws)
        assert reply["symbols"] == ["XAUUSD"] and reply["pending"] == ["XAUUSD"]
        await edge.until_wanted(lambda w: w == {"XAUUSD"})
        await asyncio.sleep(0.1)  # past the debounce: GBPJPY never shows up
        assert await edge.wanted() == {"XAUUSD"}


async def test_capacity_event_refuses_pending_clients_and_drops_the_symbol(edge: DemandEdge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws, \
            await open_native(edge.port, STATIC_KEY) as streaming:
        await send_json(streaming, {"op": "subscribe", "symbols": ["EURUSD"]})
        await recv_json(streaming)
        await recv_json(streaming)
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD", "USDSEK"], "id": 3})
        assert (await recv_json(ws))["pending"] == ["XAUUSD", "USDSEK"]
        await edge.until_wanted(lambda w: {"XAUUSD", "USDSEK"} <= w)
        started = time.monotonic()
        await edge.bus.publish_control(symbol_status_event("XAUUSD", "capacity"))
        error = await recv_json(ws)
        took = time.monotonic() - started
        print(f"\ncapacity error {took * 1000:.1f} ms after the symbol_status event")
        assert took < 1.0
        assert (error["type"], error["code"], error["symbols"]) == ("error", "capacity", ["XAUUSD"])
        # A status for a symbol that streams here already changes nothing.
        await edge.bus.publish_control(symbol_status_event("EURUSD", "capacity"))
        await edge.tick("EURUSD", 2)
        assert (await recv_json(streaming))["seq"] == 2
        await edge.tick("XAUUSD", 1)
        await edge.tick("USDSEK", 1)
        assert (await recv_json(ws))["symbol"] == "USDSEK"  # XAUUSD was dropped from this client
        await edge.until_wanted(lambda w: "XAUUSD" not in w and "USDSEK" in w)


async def test_vendor_unknown_status_refuses_with_unknown_symbol(edge: DemandEdge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["USDXYZ"]})
        assert (await recv_json(ws))["pending"] == ["USDXYZ"]
        await edge.bus.publish_control(symbol_status_event("USDXYZ", "unknown"))
        error = await recv_json(ws)
        assert (error["code"], error["symbols"]) == ("unknown_symbol", ["USDXYZ"])


async def test_a_symbol_already_refused_upstream_is_refused_at_subscribe(edge: DemandEdge) -> None:
    await edge.demand.set_status("XAUUSD", "capacity")
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD", "EURUSD"], "id": 4})
        error = await recv_json(ws)
        assert (error["code"], error["id"], error["symbols"]) == ("capacity", 4, ["XAUUSD"])
        assert await recv_json(ws) == {"type": "subscribed", "id": 4, "symbols": ["EURUSD"]}


async def test_tradermade_client_waits_for_a_pending_symbol_and_hears_refusals_as_text(
        edge: DemandEdge) -> None:
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        assert await ws.recv() == "Connected"
        await ws.send(orjson.dumps({"userKey": STATIC_KEY, "symbol": "XAUUSD,USDSEK"}).decode())
        await edge.until_wanted(lambda w: {"XAUUSD", "USDSEK"} <= w)
        await edge.tick("XAUUSD", 7)
        tick = orjson.loads(await asyncio.wait_for(ws.recv(), 2))
        assert set(tick) == {"symbol", "ts", "bid", "ask", "mid"} and tick["symbol"] == "XAUUSD"
        await edge.bus.publish_control(symbol_status_event("USDSEK", "capacity"))
        text = await asyncio.wait_for(ws.recv(), 2)
        assert isinstance(text, str) and text.startswith("Error: USDSEK:") and "limit" in text


async def test_a_refusal_whose_event_was_missed_reaches_the_pending_client_by_the_next_heartbeat() -> None:
    # The status is in the store but its fx:ctl event never reached this edge (sent while its bus
    # was away): the heartbeat reads it back for symbols still waiting for a first tick.
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console",
                            heartbeat_interval=0.2)
    bus, demand = MemoryBus(), MemoryDemandStore()
    await demand.write_catalog(Catalog(("EURUSD",), ("XAU*",)))
    app = EdgeApp(settings, bus, MemoryKeyStore(), demand)
    port = await app.start()
    try:
        async with await open_native(port, STATIC_KEY) as ws:
            await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"], "id": 1})
            assert (await recv_json(ws))["pending"] == ["XAUUSD"]
            started = time.monotonic()
            await demand.set_status("XAUUSD", "capacity")  # no event published
            error = await until(ws, lambda m: m.get("type") == "error", timeout=2)
            took = time.monotonic() - started
            print(f"\nmissed refusal reached the client {took * 1000:.0f} ms later (heartbeat 200 ms)")
            assert (error["code"], error["symbols"]) == ("capacity", ["XAUUSD"])
            assert took < 1.0
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()
