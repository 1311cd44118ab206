"""Symbols on demand at a live in-process edge: pending subscriptions, first ticks, refusals, and
nothing stale: a symbol not streamed now gets no snapshot, one refused later is dropped aloud."""

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
from shared.demand import Catalog, MemoryDemandStore, Verdict, symbol_status_event
from shared.keystore import MemoryKeyStore
from shared.memory_bus import MemoryBus
from shared.settings import EdgeSettings
from shared.tick import Position, Tick, encode_tick
from tests.component.conftest import STATIC_KEY
from tests.support.client import open_native, recv_json, send_json, until


class DemandEdge:
    def __init__(self, app: EdgeApp, bus: MemoryBus, demand: MemoryDemandStore, port: int) -> None:
        self.app, self.bus, self.demand, self.port = app, bus, demand, port

    async def tick(self, symbol: str, seq: int, epoch: str = "e1") -> None:
        tick = Tick(symbol, 1.1, 1.2, 1.15, 1732186000000 + seq, epoch, seq)
        await self.bus.publish([Message(symbol, seq, encode_tick(tick))])

    async def verdict(self, symbol: str, verdict: Verdict, announce: bool = True) -> None:
        """What the leader's reporter does: the hash, then the event."""
        await self.demand.set_status(symbol, verdict)
        if announce:
            await self.bus.publish_control(symbol_status_event(symbol, verdict))

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
        # Streamed now (the leader's verdict names its first tick this term): a second client
        # gets a snapshot, like for any streamed symbol.
        await edge.verdict("XAUUSD", Verdict("streaming", Position("e1", 41)))
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
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD", "USDSEK"], "id": 3})
        assert (await recv_json(ws))["pending"] == ["XAUUSD", "USDSEK"]
        await edge.until_wanted(lambda w: {"XAUUSD", "USDSEK"} <= w)
        started = time.monotonic()
        await edge.verdict("XAUUSD", Verdict("capacity"))
        error = await recv_json(ws)
        took = time.monotonic() - started
        print(f"\ncapacity error {took * 1000:.1f} ms after the symbol_status event")
        assert took < 1.0
        assert (error["type"], error["code"], error["symbols"]) == ("error", "capacity", ["XAUUSD"])
        await edge.tick("XAUUSD", 1)
        await edge.tick("USDSEK", 1)
        assert (await recv_json(ws))["symbol"] == "USDSEK"  # XAUUSD was dropped from this client
        await edge.until_wanted(lambda w: "XAUUSD" not in w and "USDSEK" in w)


async def test_a_streaming_symbol_refused_later_is_refused_to_its_clients_never_silence(
        edge: DemandEdge) -> None:
    # Streaming, then refused (a new leader with less room): every client holding it hears why
    # and loses it, configured symbols included.
    await edge.tick("XAUUSD", 1)
    await edge.verdict("XAUUSD", Verdict("streaming", Position("e1", 1)))
    async with await open_native(edge.port, STATIC_KEY) as ws, \
            await open_native(edge.port, STATIC_KEY) as other:
        for client in (ws, other):
            await send_json(client, {"op": "subscribe", "symbols": ["XAUUSD", "EURUSD"]})
            assert "pending" not in await recv_json(client)
            assert {(await recv_json(client))["symbol"] for _ in range(2)} == {"XAUUSD", "EURUSD"}
        started = time.monotonic()
        await edge.verdict("XAUUSD", Verdict("capacity"))
        await edge.verdict("EURUSD", Verdict("unknown"))
        for client in (ws, other):
            first, second = await recv_json(client), await recv_json(client)
            assert (first["code"], first["symbols"]) == ("capacity", ["XAUUSD"])
            assert (second["code"], second["symbols"]) == ("unknown_symbol", ["EURUSD"])
        took = time.monotonic() - started
        await edge.until_wanted(lambda w: not w)
        await edge.tick("XAUUSD", 2)
        await send_json(ws, {"op": "ping", "id": 9})
        assert await recv_json(ws) == {"type": "pong", "id": 9}  # no tick of a dropped symbol
    print(f"\nstreaming symbols refused: both clients told within {took * 1000:.0f} ms")
    assert took < 1.0


async def test_a_symbol_not_streamed_now_is_pending_without_its_old_snapshot(edge: DemandEdge) -> None:
    # XAUUSD streamed once (fx:last holds seq 5) and was dropped since: no verdict now.
    await edge.tick("XAUUSD", 5)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"], "id": 1})
        assert await recv_json(ws) == {"type": "subscribed", "id": 1, "symbols": ["XAUUSD"],
                                       "pending": ["XAUUSD"]}
        # A leader streams it again, continuing the numbering: the next tick is the first one.
        await edge.tick("XAUUSD", 6)
        tick = await recv_json(ws)
        assert (tick["seq"], tick.get("snapshot")) == (6, None)
        # A resume from before: no exact replay of a stream that was not current, said so.
        async with await open_native(edge.port, STATIC_KEY) as other:
            await edge.verdict("XAUUSD", Verdict("streaming", Position("e1", 7)))  # its first: 7
            await send_json(other, {"op": "subscribe", "symbols": ["XAUUSD"],
                                    "since": {"XAUUSD": {"epoch": "e1", "seq": 4}}})
            reply = await recv_json(other)
            assert (reply["pending"], reply["recovered"]) == (["XAUUSD"], {"XAUUSD": False})
            await edge.tick("XAUUSD", 7)
            assert (await recv_json(other))["seq"] == 7


async def test_a_symbol_outside_the_catalogue_now_is_unknown_even_though_it_ticked(edge: DemandEdge) -> None:
    await edge.tick("USDSEK", 3)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["USDSEK"]})
        assert (await recv_json(ws))["pending"] == ["USDSEK"]
        await edge.demand.write_catalog(Catalog(("EURUSD",), ("XAU*",)))  # a leader without USD???
        await asyncio.sleep(1.1)  # the edge trusts a catalogue it read for 1 s
        async with await open_native(edge.port, STATIC_KEY) as other:
            await send_json(other, {"op": "subscribe", "symbols": ["USDSEK"], "id": 2})
            error = await recv_json(other)
            assert (error["code"], error["id"], error["symbols"]) == ("unknown_symbol", 2, ["USDSEK"])


async def test_vendor_unknown_status_refuses_with_unknown_symbol(edge: DemandEdge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["USDXYZ"]})
        assert (await recv_json(ws))["pending"] == ["USDXYZ"]
        await edge.verdict("USDXYZ", Verdict("unknown"))
        error = await recv_json(ws)
        assert (error["code"], error["symbols"]) == ("unknown_symbol", ["USDXYZ"])


async def test_a_symbol_already_refused_upstream_is_refused_at_subscribe(edge: DemandEdge) -> None:
    await edge.verdict("XAUUSD", Verdict("capacity"), announce=False)
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
        await edge.verdict("USDSEK", Verdict("capacity"))
        text = await asyncio.wait_for(ws.recv(), 2)
        assert isinstance(text, str) and text.startswith("Error: USDSEK:") and "limit" in text


async def test_a_refusal_whose_event_was_missed_reaches_the_client_by_the_next_heartbeat() -> None:
    # The verdict is in the store but its fx:ctl event never reached this edge (sent while its bus
    # was away): the heartbeat reads verdicts back for every symbol held, streaming ones too, and
    # the catalogue: a symbol it no longer allows is refused as well.
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console",
                            heartbeat_interval=0.2)
    bus, demand = MemoryBus(), MemoryDemandStore()
    await demand.write_catalog(Catalog(("EURUSD",), ("XAU*", "USDSEK")))
    app = EdgeApp(settings, bus, MemoryKeyStore(), demand)
    port = await app.start()
    try:
        async with await open_native(port, STATIC_KEY) as ws:
            await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD", "USDSEK"], "id": 1})
            assert (await recv_json(ws))["pending"] == ["XAUUSD", "USDSEK"]
            tick = Tick("XAUUSD", 1.1, 1.2, 1.15, 1732186000001, "e1", 1)
            await bus.publish([Message("XAUUSD", 1, encode_tick(tick))])
            assert (await recv_json(ws))["seq"] == 1  # streaming now
            started = time.monotonic()
            await demand.set_status("XAUUSD", Verdict("capacity"))  # no event published
            await demand.write_catalog(Catalog(("EURUSD",), ("XAU*",)))
            errors = [await until(ws, lambda m: m.get("type") == "error", timeout=2) for _ in range(2)]
            took = time.monotonic() - started
            print(f"\nmissed refusal reached the client {took * 1000:.0f} ms later (heartbeat 200 ms)")
            assert sorted((e["code"], tuple(e["symbols"])) for e in errors) == [
                ("capacity", ("XAUUSD",)), ("unknown_symbol", ("USDSEK",))]
            assert took < 1.5
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()


class TickingStore(MemoryDemandStore):
    """A demand store across whose verdict read the symbol keeps ticking (a busy feed, a slow
    Redis): what the edge's stream moves on meanwhile must still reach the subscriber."""

    def __init__(self) -> None:
        super().__init__()
        self.during: list[int] = []
        self.edge: DemandEdge | None = None

    async def statuses(self, symbols: Any) -> dict[str, Verdict]:
        assert self.edge is not None
        for seq in self.during:
            await self.edge.tick("EURUSD", seq)
        self.during = []
        return await super().statuses(symbols)


@pytest.mark.parametrize("since", [None, 2], ids=["snapshot", "resume"])
async def test_ticks_that_arrive_while_the_verdicts_are_read_are_not_skipped(since: int | None) -> None:
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console")
    bus, demand = MemoryBus(), TickingStore()
    await demand.write_catalog(Catalog(("EURUSD",), ()))
    app = EdgeApp(settings, bus, MemoryKeyStore(), demand)
    edge = demand.edge = DemandEdge(app, bus, demand, await app.start())
    try:
        for seq in range(1, 6):
            await edge.tick("EURUSD", seq)
        demand.during = [6, 7, 8]  # published while the edge awaits its first subscriber's verdicts
        async with await open_native(edge.port, STATIC_KEY) as ws:
            msg: dict[str, Any] = {"op": "subscribe", "symbols": ["EURUSD"]}
            if since is not None:
                msg["since"] = {"EURUSD": {"epoch": "e1", "seq": since}}
            await send_json(ws, msg)
            reply = await recv_json(ws)
            assert reply.get("recovered") == (None if since is None else {"EURUSD": True})
            await edge.tick("EURUSD", 9)
            seqs = [(await recv_json(ws))["seq"]]
            while seqs[-1] < 9:
                seqs.append((await recv_json(ws))["seq"])
        # A snapshot may be any tick up to the newest; whatever follows it has no hole.
        assert seqs == list(range(seqs[0], 10)), seqs
        assert seqs[0] == 3 if since else seqs[0] >= 5, seqs
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()


class FailingStore(MemoryDemandStore):
    """A demand store whose reads fail while `down` (its Redis shard failing over)."""

    down = False

    async def catalog(self) -> Catalog | None:
        if self.down:
            raise ConnectionError("store down")
        return await super().catalog()

    async def statuses(self, symbols: Any) -> dict[str, Verdict]:
        if self.down:
            raise ConnectionError("store down")
        return await super().statuses(symbols)


async def test_while_the_store_is_down_the_cached_catalogue_judges_subscribes() -> None:
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console")
    bus, demand = MemoryBus(), FailingStore()
    app = EdgeApp(settings, bus, MemoryKeyStore(), demand)
    edge = DemandEdge(app, bus, demand, await app.start())
    try:
        await edge.tick("EURUSD", 1)
        await edge.tick("XAUUSD", 1)
        await edge.verdict("XAUUSD", Verdict("streaming", Position("e1", 1)))
        async with await open_native(edge.port, STATIC_KEY) as ws:
            demand.down = True  # and no catalogue read yet: nothing to judge by
            await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "id": 1})
            error = await recv_json(ws)
            assert (error["code"], error["id"]) == ("unavailable", 1)
            demand.down = False
            await demand.write_catalog(Catalog(("EURUSD",), ("XAU*",)))
            await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "id": 2})
            assert (await recv_json(ws))["symbols"] == ["EURUSD"]
            assert (await recv_json(ws))["snapshot"] is True
            demand.down = True
            await asyncio.sleep(1.1)  # past CATALOG_TTL: the edge would read the catalogue again
            # Configured: served as ever. On demand: its verdict is unknown, so no snapshot that
            # might be stale; pending until its next tick. Outside the catalogue: unknown.
            await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD", "GBPJPY"], "id": 3})
            error = await recv_json(ws)
            assert (error["code"], error["symbols"]) == ("unknown_symbol", ["GBPJPY"])
            assert await recv_json(ws) == {"type": "subscribed", "id": 3, "symbols": ["XAUUSD"],
                                           "pending": ["XAUUSD"]}
            await edge.tick("XAUUSD", 2)
            assert ((await recv_json(ws))["seq"]) == 2
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()
