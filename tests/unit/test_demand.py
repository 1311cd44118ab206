"""Symbols on demand, sans I/O: what the leader streams, and how an edge judges a symbol with no tick."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from edge import protocol as proto
from edge.demand import NOT_IN_CATALOG, REFUSALS, judge
from edge.protocol import ErrorCode
from ingestor import demand as demand_module
from ingestor.demand import DemandPolicy, DemandWatcher, StatusReporter
from shared.demand import Catalog, MemoryDemandStore, parse_symbol_status, symbol_status_event
from shared.memory_bus import MemoryBus
from shared.names import Names


def test_static_symbols_always_stream_first_then_on_demand_ones_in_the_order_first_wanted() -> None:
    policy = DemandPolicy(["EURUSD", "GBPUSD", "EURUSD"], ["XAU*", "USD???"], grace=30)
    assert policy.update(set(), 0.0) == ("EURUSD", "GBPUSD")
    assert policy.update({"USDSEK"}, 1.0) == ("EURUSD", "GBPUSD", "USDSEK")
    # Wanted again, and a static symbol wanted too: neither moves nor doubles.
    assert policy.update({"XAUUSD", "USDSEK", "EURUSD"}, 2.0) == ("EURUSD", "GBPUSD", "USDSEK", "XAUUSD")


def test_only_symbols_matching_the_on_demand_globs_are_streamed() -> None:
    policy = DemandPolicy(["EURUSD"], ["XAU*"], grace=30)
    assert policy.update({"XAUUSD", "USDJPY", "XAGUSD"}, 0.0) == ("EURUSD", "XAUUSD")
    assert DemandPolicy(["EURUSD"], [], grace=30).update({"XAUUSD"}, 0.0) == ("EURUSD",)


def test_an_on_demand_symbol_nobody_wants_is_dropped_only_after_the_grace_period() -> None:
    policy = DemandPolicy(["EURUSD"], ["*"], grace=30)
    policy.update({"XAUUSD"}, 100.0)
    assert policy.update(set(), 110.0) == ("EURUSD", "XAUUSD")  # the grace starts now
    assert policy.update(set(), 139.9) == ("EURUSD", "XAUUSD")
    assert policy.update(set(), 140.0) == ("EURUSD",)
    # Wanted again inside the grace: it starts over the next time nobody wants it.
    policy.update({"XAUUSD"}, 200.0)
    policy.update(set(), 210.0)
    policy.update({"XAUUSD"}, 225.0)
    assert policy.update(set(), 250.0) == ("EURUSD", "XAUUSD")
    assert policy.update(set(), 279.9) == ("EURUSD", "XAUUSD")
    assert policy.update(set(), 280.0) == ("EURUSD",)


def test_zero_grace_drops_at_the_first_poll_without_demand() -> None:
    policy = DemandPolicy(["EURUSD"], ["*"], grace=0)
    assert policy.update({"XAUUSD"}, 1.0) == ("EURUSD", "XAUUSD")
    assert policy.update(set(), 1.25) == ("EURUSD",)


def test_edge_judges_symbols_without_a_tick_against_catalogue_and_upstream_status() -> None:
    catalog = Catalog(("EURUSD",), ("XAU*", "USD???"))
    verdicts = judge(["EURUSD", "XAUUSD", "USDSEK", "USDNOK", "GBPJPY"], catalog,
                     {"USDSEK": "capacity", "USDNOK": "unknown", "XAUUSD": "streaming"})
    assert verdicts == {
        "EURUSD": None,  # static, not ticked yet (ingestor just started): pending
        "XAUUSD": None,
        "USDSEK": (ErrorCode.CAPACITY, REFUSALS["capacity"][1]),
        "USDNOK": (ErrorCode.UNKNOWN_SYMBOL, REFUSALS["unknown"][1]),
        "GBPJPY": NOT_IN_CATALOG,
    }
    assert judge(["EURUSD"], None, {}) == {"EURUSD": NOT_IN_CATALOG}  # no leader ever wrote one


def test_catalog_round_trips_and_nonsense_reads_as_none() -> None:
    catalog = Catalog(("EURUSD", "GBPUSD"), ("XAU*",))
    assert Catalog.decode(catalog.encode()) == catalog
    for raw in (b"nope", b"[]", b'{"static":"EURUSD","on_demand":[]}', b'{"static":[1],"on_demand":[]}'):
        assert Catalog.decode(raw) is None


def test_symbol_status_events_parse_and_others_do_not() -> None:
    event = orjson.loads(symbol_status_event("XAUUSD", "capacity"))
    assert parse_symbol_status(event) == ("XAUUSD", "capacity")
    for event in ({"type": "symbol_status", "symbol": "X", "status": "bogus"},
                  {"type": "key_changed", "key": "abc"}, {"type": "symbol_status", "symbol": 1,
                                                           "status": "unknown"}, [1], "x"):
        assert parse_symbol_status(event) is None


def test_subscribed_reply_lists_pending_symbols_and_capacity_is_an_error_code() -> None:
    reply = orjson.loads(proto.subscribed(1, ["EURUSD", "XAUUSD"], pending=["XAUUSD"]))
    assert reply == {"type": "subscribed", "id": 1, "symbols": ["EURUSD", "XAUUSD"], "pending": ["XAUUSD"]}
    assert "pending" not in orjson.loads(proto.subscribed(1, ["EURUSD"], pending=[]))
    error = orjson.loads(proto.error(ErrorCode.CAPACITY, "XAUUSD: full", 1, ["XAUUSD"]))
    assert error["code"] == "capacity" and error["symbols"] == ["XAUUSD"]


def test_demand_keys_share_one_builder_and_the_prefix() -> None:
    names = Names("p:")
    assert (names.demand("edge-1"), names.catalog, names.symbol_status) == (
        "p:demand:edge-1", "p:catalog", "p:symstatus")


async def test_memory_store_unions_edges_and_forgets_a_withdrawn_one() -> None:
    store = MemoryDemandStore()
    await store.publish("a", {"XAUUSD", "EURUSD"}, ttl=15)
    await store.publish("b", {"USDSEK"}, ttl=15)
    assert await store.union() == {"XAUUSD", "EURUSD", "USDSEK"}
    await store.withdraw("a")
    assert await store.union() == {"USDSEK"}


async def test_watcher_writes_the_catalogue_reports_changes_and_clears_dropped_statuses() -> None:
    store = MemoryDemandStore()
    seen: list[tuple[str, ...]] = []
    watcher = DemandWatcher(store, ["EURUSD"], ["XAU*"], 0.1, seen.append, interval=0.02)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.05)
        assert seen == [("EURUSD",)]  # once at the start, then only on change
        assert store.stored_catalog == Catalog(("EURUSD",), ("XAU*",))
        await store.publish("edge", {"XAUUSD"}, ttl=15)
        await store.set_status("XAUUSD", "capacity")
        await asyncio.sleep(0.05)
        assert seen[-1] == ("EURUSD", "XAUUSD")
        await store.withdraw("edge")
        await asyncio.sleep(0.3)  # grace 0.1 s
        assert seen[-1] == ("EURUSD",) and len(seen) == 3
        assert await store.statuses(["XAUUSD"]) == {}  # a later subscriber is tried afresh
    finally:
        task.cancel()


async def test_watcher_writes_the_catalogue_again_after_it_was_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demand_module, "CATALOG_INTERVAL", 0.1)
    store = MemoryDemandStore()
    watcher = DemandWatcher(store, ["EURUSD"], ["XAU*"], 30, lambda wanted: None, interval=0.02)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.05)
        assert store.stored_catalog is not None
        store.stored_catalog = None  # a Redis restart without its data
        await asyncio.sleep(0.2)
        assert store.stored_catalog == Catalog(("EURUSD",), ("XAU*",))
    finally:
        task.cancel()


async def test_status_reporter_writes_the_hash_then_announces_on_ctl() -> None:
    store, bus = MemoryDemandStore(), MemoryBus()
    events: list[bytes] = []
    sub = bus.subscriber(lambda s, p: None, events.append, lambda up: None)
    sub_task = asyncio.create_task(sub.run())
    reporter = StatusReporter(store, bus)
    task = asyncio.create_task(reporter.run())
    try:
        await asyncio.sleep(0)
        reporter.report("XAUUSD", "capacity")
        reporter.report("USDSEK", "streaming")
        await asyncio.sleep(0.02)
        assert await store.statuses(["XAUUSD", "USDSEK"]) == {"XAUUSD": "capacity", "USDSEK": "streaming"}
        assert [parse_symbol_status(orjson.loads(e)) for e in events] == [
            ("XAUUSD", "capacity"), ("USDSEK", "streaming")]
    finally:
        task.cancel()
        await bus.close()
        await sub_task
