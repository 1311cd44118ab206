"""Symbols on demand with real processes: simfeed -> ingestor(s) -> Redis -> edge(s) -> clients.

The simfeed streams whatever catalogue symbols a login names; the static list is conftest's
SYMBOLS (five pairs), the on-demand globs let clients call up XAUUSD, USDSEK and ZZZ* (which
the simfeed does not carry: it answers with an unknown-symbols notice, as a vendor does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect

from ingestor.demand import DemandWatcher, take_over
from ingestor.pool import UpstreamPool
from ingestor.verdicts import StatusBook, StatusReporter
from shared.demand import Catalog, RedisDemandStore, Verdict
from shared.keystore import RedisKeyStore
from shared.redis_bus import RedisBus
from shared.tick import Position
from tests.conftest import API_KEY, SYMBOLS, Cluster
from tests.support.client import assert_no_gaps, live_ticks, open_native, recv_json, send_json, until
from tests.support.ports import free_port
from tests.support.procs import Proc, metric
from tests.support.upstream import fake_sessions, settings, settle

pytestmark = pytest.mark.integration

STATIC = len(SYMBOLS.split(","))
GAUGE = "fxproxy_ingestor_upstream_symbols"
DEMAND = {"FXPROXY_ON_DEMAND": "XAU*,USDSEK,ZZZ*", "FXPROXY_DEMAND_GRACE": "1"}
FAST_HEARTBEAT = {"FXPROXY_HEARTBEAT_INTERVAL": "0.5"}  # demand TTL 1.5 s


def ingestor(cluster: Cluster, **env: str) -> tuple[Proc, int]:
    port = free_port()
    return cluster.ingestor(FXPROXY_METRICS_PORT=str(port), **DEMAND, **env), port


async def gauge_until(port: int, pred: Callable[[float], bool], timeout: float) -> float:
    """Seconds until the ingestor's upstream-symbols gauge satisfies `pred`."""
    started = time.monotonic()
    while True:
        value = metric(port, GAUGE, default=-1)
        if pred(value):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{GAUGE} is {value} after {timeout}s"
        await asyncio.sleep(0.05)


async def streaming(port: int) -> ClientConnection:
    """A client that has seen EURUSD tick: the leader streams and has written the catalogue."""
    ws = await open_native(port, API_KEY)
    deadline = time.monotonic() + 15
    while True:  # unknown_symbol until the ingestor has led once (no catalogue, no tick yet)
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
        reply = await until(ws, lambda m: m.get("type") in ("subscribed", "error"))
        if reply["type"] == "subscribed":
            break
        assert reply["code"] == "unknown_symbol" and time.monotonic() < deadline, reply
        await asyncio.sleep(0.2)
    await live_ticks(ws, 1, timeout=15)
    return ws


async def first_tick(ws: ClientConnection, symbol: str, timeout: float = 10.0) -> dict[str, Any]:
    return await until(ws, lambda m: m.get("type") == "tick" and m["symbol"] == symbol, timeout)


async def test_redis_store_unions_only_live_edges_and_a_set_expires_with_its_ttl(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url)
    store, keys = RedisDemandStore(bus.client, bus.names), RedisKeyStore(bus.client, bus.names)
    try:
        for edge in ("a", "b", "dead"):
            await store.publish(edge, {f"{edge.upper()}XXX", "XAUUSD"}, ttl=0.3)
        await keys.heartbeat("a", 0.3)
        await keys.heartbeat("b", 0.3)
        assert await store.union() == {"AXXX", "BXXX", "XAUUSD"}  # "dead" never beat
        await store.publish("b", set(), ttl=0.3)  # its clients left
        assert await store.union() == {"AXXX", "XAUUSD"}
        await asyncio.sleep(0.35)
        assert await store.union() == set()  # heartbeats and sets ran out
        assert await bus.client.exists("fx:demand:a") == 0
        await store.write_catalog(Catalog(("EURUSD",), ("XAU*",)))
        assert await store.catalog() == Catalog(("EURUSD",), ("XAU*",))
        await store.set_status("XAUUSD", Verdict("capacity"))
        await store.set_status("USDSEK", Verdict("streaming", Position("e1", 4)))
        await bus.client.hset("fx:symstatus", "JUNK", "nonsense")
        assert await store.statuses(["XAUUSD", "JUNK", "USDSEK"]) == {
            "XAUUSD": Verdict("capacity"), "USDSEK": Verdict("streaming", Position("e1", 4))}
        await store.write_handover([("XAUUSD", None), ("USDSEK", 1733000000.5)])
        assert await store.handover() == [("XAUUSD", None), ("USDSEK", 1733000000.5)]
        await store.clear_status(["XAUUSD"])
        assert await store.statuses(["XAUUSD"]) == {}
        await store.reset_statuses()
        assert await store.statuses(["USDSEK"]) == {}
    finally:
        await bus.close()


async def test_a_called_up_symbol_streams_then_is_dropped_after_the_grace(cluster: Cluster) -> None:
    cluster.simfeed()
    ing, metrics_port = ingestor(cluster)
    _, port = cluster.edge(**FAST_HEARTBEAT)
    async with await streaming(port) as ws:
        await gauge_until(metrics_port, lambda v: v == STATIC, 5)
        started = time.monotonic()
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"], "id": 1})
        reply = await until(ws, lambda m: m.get("type") == "subscribed")
        assert reply["symbols"] == ["XAUUSD"] and reply["pending"] == ["XAUUSD"]
        tick = await first_tick(ws, "XAUUSD")
        took = time.monotonic() - started
        assert "snapshot" not in tick
        print(f"\nsubscribe to a symbol nobody streamed -> first tick in {took:.2f}s "
              "(demand debounce + poll + upstream re-login)")
        assert took < 3.0
        await gauge_until(metrics_port, lambda v: v == STATIC + 1, 2)
        xau = [tick] + [t for t in await live_ticks(ws, 10) if t["symbol"] == "XAUUSD"]
        assert_no_gaps(xau)
        await send_json(ws, {"op": "unsubscribe", "symbols": ["XAUUSD"]})
        await until(ws, lambda m: m.get("type") == "unsubscribed")
        left = time.monotonic()
        await gauge_until(metrics_port, lambda v: v == STATIC, 5)
        dropped = time.monotonic() - left
        print(f"client left -> dropped upstream after {dropped:.2f}s (grace 1 s)")
        assert 1.0 <= dropped < 1 + 2.0, "dropped before the grace ran out, or long after"
        # EURUSD kept flowing across both upstream changes, without a gap
        assert_no_gaps([t for t in await live_ticks(ws, 20) if t["symbol"] == "EURUSD"])
    assert '"dropped":["XAUUSD"]' in ing.log


async def test_symbols_outside_the_globs_are_unknown_and_tradermade_clients_wait_for_pending(
        cluster: Cluster) -> None:
    cluster.simfeed()
    _, metrics_port = ingestor(cluster)
    _, port = cluster.edge()
    async with await streaming(port) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["GBPJPY"], "id": 2})
        error = await recv_json(ws)
        while error.get("type") == "tick":
            error = await recv_json(ws)
        assert (error["type"], error["code"], error["symbols"]) == ("error", "unknown_symbol", ["GBPJPY"])
        async with connect(f"ws://127.0.0.1:{port}/feedadv", open_timeout=5) as tm:
            assert await tm.recv() == "Connected"
            started = time.monotonic()
            await tm.send(orjson.dumps({"userKey": API_KEY, "symbol": "USDSEK"}).decode())
            first = orjson.loads(await asyncio.wait_for(tm.recv(), 10))
            took = time.monotonic() - started
        print(f"\nTraderMade login to a pending symbol -> first tick in {took:.2f}s")
        assert first["symbol"] == "USDSEK" and set(first) == {"symbol", "ts", "bid", "ask", "mid"}
        assert took < 3.0
    assert metric(metrics_port, GAUGE) in (STATIC, STATIC + 1)  # USDSEK within its grace, or gone


async def refused_after_pending(ws: ClientConnection, symbol: str, id: int) -> tuple[dict[str, Any], float]:
    """Subscribe to `symbol`, see it pending, then wait for its refusal: (error, seconds taken)."""
    started = time.monotonic()
    await send_json(ws, {"op": "subscribe", "symbols": [symbol], "id": id})
    reply = await until(ws, lambda m: m.get("type") == "subscribed")
    assert reply["pending"] == [symbol]
    error = await until(ws, lambda m: m.get("type") == "error")
    return error, time.monotonic() - started


async def test_over_the_vendor_limits_the_pending_client_gets_capacity(cluster: Cluster) -> None:
    cluster.simfeed()
    # One session of five symbols: the static five fill it, so XAUUSD has no room.
    ingestor(cluster, FXPROXY_UPSTREAM_MAX_SYMBOLS=str(STATIC))
    _, port = cluster.edge()
    async with await streaming(port) as ws:
        error, took = await refused_after_pending(ws, "XAUUSD", 3)
        print(f"\ncapacity error at the client {took * 1000:.0f} ms after its subscribe")
        assert (error["code"], error["symbols"]) == ("capacity", ["XAUUSD"])
        assert took < 2.0
        # A later subscriber is refused at once, from fx:symstatus.
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"], "id": 4})
        again = await until(ws, lambda m: m.get("type") == "error")
        assert (again["code"], again["id"]) == ("capacity", 4)
        # The static symbols never stopped for it.
        assert_no_gaps([t for t in await live_ticks(ws, 20) if t["symbol"] == "EURUSD"])


async def test_a_symbol_the_vendor_does_not_carry_is_unknown_to_the_pending_client(
        cluster: Cluster) -> None:
    cluster.simfeed()
    ingestor(cluster)
    _, port = cluster.edge()
    async with await streaming(port) as ws:
        error, took = await refused_after_pending(ws, "ZZZUSD", 5)
        print(f"\nvendor's unknown-symbol notice at the client {took * 1000:.0f} ms after its subscribe")
        assert (error["code"], error["symbols"]) == ("unknown_symbol", ["ZZZUSD"])
        assert took < 3.0


async def test_a_previous_leaders_refusal_does_not_bind_the_next_one(cluster: Cluster) -> None:
    # fx:symstatus left by a leader that refused XAUUSD (capacity) and then died within the grace.
    stale = redis.Redis.from_url(cluster.redis_url)
    try:
        stale.hset("fx:symstatus", "XAUUSD", "capacity")
    finally:
        stale.close()
    cluster.simfeed()
    ingestor(cluster)
    _, port = cluster.edge()
    async with await streaming(port) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"], "id": 6})
        reply = await until(ws, lambda m: m.get("type") in ("subscribed", "error"))
        assert reply["type"] == "subscribed" and reply["pending"] == ["XAUUSD"], reply
        await first_tick(ws, "XAUUSD")


async def test_demand_survives_a_leader_change(cluster: Cluster) -> None:
    cluster.simfeed()
    ingestors = {node: ingestor(cluster, FXPROXY_NODE_ID=node, FXPROXY_LEADER_TTL="1")
                 for node in ("a", "b")}
    _, port = cluster.edge()
    client = redis.Redis.from_url(cluster.redis_url)
    async with await streaming(port) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"]})
        before = [await first_tick(ws, "XAUUSD")]
        before += [t for t in await live_ticks(ws, 10) if t["symbol"] == "XAUUSD"]
        leader = client.get("fx:leader").decode().split(".")[0]
        standby = "b" if leader == "a" else "a"
        ingestors[leader][0].kill()
        killed = time.monotonic()
        await asyncio.sleep(0.2)  # let the killed leader's last ticks drain
        after = [await first_tick(ws, "XAUUSD", timeout=15)]
        took = time.monotonic() - killed
        after += [t for t in await live_ticks(ws, 10) if t["symbol"] == "XAUUSD"]
    assert client.get("fx:leader").decode().split(".")[0] == standby
    client.close()
    print(f"\nleader killed: the standby streams the on-demand symbol after {took:.2f}s (ttl 1 s)")
    assert took < 1 + 1 / 3 + 2.5, "takeover + demand read + login took too long"
    assert_no_gaps(before + after)
    assert metric(ingestors[standby][1], GAUGE) == STATIC + 1


async def test_a_dead_edges_demand_expires_and_then_waits_out_the_grace(cluster: Cluster) -> None:
    cluster.simfeed()
    ing, metrics_port = ingestor(cluster)
    edge, port = cluster.edge(**FAST_HEARTBEAT)
    bus = RedisBus.from_url(cluster.redis_url)
    store = RedisDemandStore(bus.client, bus.names)
    try:
        async with await streaming(port) as ws:
            await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"]})
            await first_tick(ws, "XAUUSD")
            await gauge_until(metrics_port, lambda v: v == STATIC + 1, 2)
            edge.kill()
            killed = time.monotonic()
        while "XAUUSD" in await store.union():  # its heartbeat and demand set run out
            assert time.monotonic() - killed < 5, "a dead edge's demand never expired"
            await asyncio.sleep(0.01)
        expired = time.monotonic()
        await gauge_until(metrics_port, lambda v: v == STATIC, 10)
        dropped = time.monotonic()
    finally:
        await bus.close()
    print(f"\nedge killed -9: its demand expired after {expired - killed:.2f}s (TTL 1.5 s), the symbol "
          f"was dropped upstream {dropped - expired:.2f}s later (grace 1 s)")
    # Its last heartbeat was 0-0.5 s before the kill, so the demand lives 1.0-1.5 s after it.
    assert 0.9 <= expired - killed < 1.5 + 1.0
    # The grace runs from the leader's first look without the demand, at or after it expired; the
    # drop comes at a look after that (0.25 s polls; gauge read every 0.05 s, union every 0.01 s).
    assert 1.0 - 0.02 <= dropped - expired < 1.0 + 1.5
    assert '"dropped":["XAUUSD"]' in ing.log


async def test_a_new_leader_keeps_what_the_last_one_streamed_read_from_redis(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Room for one on-demand symbol. The last leader streams XAUUSD, wanted first, and refuses
    # the seven wanted after it. A new leader reads the same set back from Redis (SUNION: its order
    # is the hash's, not the wanting's) and must keep XAUUSD, which sorts last.
    fake_sessions(monkeypatch)
    bus = RedisBus.from_url(redis_url)
    store, keys = RedisDemandStore(bus.client, bus.names), RedisKeyStore(bus.client, bus.names)
    later = ["XAGUSD", "XAUAUD", "XAUCHF", "XAUEUR", "XAUGBP", "XAUJPY", "XAUNZD"]
    limits = settings("EURUSD", 2, 1)

    async def term(seed: list[tuple[str, float | None]]) -> tuple[UpstreamPool, DemandWatcher, StatusBook,
                                                                    StatusReporter, list[asyncio.Task[None]]]:
        reporter = StatusReporter(store, bus)
        book = StatusBook(reporter.report)
        pool = UpstreamPool(limits, lambda q: None, book.pool_status)

        def want(symbols: tuple[str, ...]) -> None:
            book.want(symbols)
            pool.want(symbols)

        watcher = DemandWatcher(store, ["EURUSD"], ["X*"], 30, want, seed=seed)
        return pool, watcher, book, reporter, [asyncio.create_task(pool.run()),
                                                asyncio.create_task(reporter.run())]

    tasks: list[asyncio.Task[None]] = []
    try:
        for edge in ("a", "b"):
            await keys.heartbeat(edge, 30)
        await store.publish("a", {"XAUUSD"}, ttl=30)
        pool, watcher, book, reporter, tasks = await term([])
        await watcher.poll()
        await settle()
        for symbol in pool.streamed():
            book.quoted(symbol, Position("e1", 1))  # its first tick this term
        await store.publish("b", set(later), ttl=30)
        await watcher.poll()
        await settle()
        first = pool.streamed()
        await asyncio.wait_for(reporter.flushed(), 5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The leader dies; the next one takes over from what Redis holds.
        seed = await take_over(store)
        await store.reset_statuses()
        pool, watcher, book, reporter, tasks = await term(seed)
        await watcher.poll()
        await settle()
        second = pool.streamed()
        order = watcher.wanted
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()
    assert first == {"EURUSD", "XAUUSD"}
    assert order == ("EURUSD", "XAUUSD", *later) and second == {"EURUSD", "XAUUSD"}
