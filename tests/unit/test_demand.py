"""Symbols on demand, sans I/O: what the leader streams and says of each symbol, and how an edge
judges a subscription by it."""

from __future__ import annotations

import asyncio
import contextlib

import orjson

from edge import protocol as proto
from edge.demand import NOT_IN_CATALOG, PENDING, REFUSALS, SERVE, judge
from edge.protocol import ErrorCode
from ingestor.demand import DemandPolicy, DemandWatcher, take_over
from ingestor.verdicts import StatusBook, StatusReporter
from shared.demand import (
    Catalog,
    MemoryDemandStore,
    Verdict,
    decode_handover,
    encode_handover,
    parse_symbol_status,
    symbol_status_event,
)
from shared.memory_bus import MemoryBus
from shared.names import Names
from shared.tick import Position

P = Position


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


def test_edge_judges_every_symbol_by_the_catalogue_and_the_leaders_verdict() -> None:
    catalog = Catalog(("EURUSD",), ("XAU*", "USD???"))
    verdicts = {"USDSEK": Verdict("capacity"), "USDNOK": Verdict("unknown"),
                "XAUUSD": Verdict("streaming", P("e1", 41)), "XAGUSD": Verdict("streaming", P("e1", 41)),
                "XAUEUR": Verdict("streaming", P("e2", 1)), "EURUSD": Verdict("streaming", P("e1", 9))}
    newest = {
        "EURUSD": P("e1", 3),  # configured: served, whatever its verdict's position
        "XAUUSD": P("e1", 41),  # streamed now, and what is stored is from this stream: served
        "XAGUSD": None,  # not allowed by the globs (XAU* only)
        "XAUEUR": P("e1", 500),  # streamed now, but what is stored is from an earlier stream
        "XAUJPY": P("e1", 7),  # ticked once, not streamed now: no stale snapshot
        "USDCHF": None,  # allowed, nobody streams it yet
        "USDSEK": P("e1", 2), "USDNOK": None, "GBPJPY": P("e1", 2),
    }
    assert judge(newest, catalog, verdicts) == {
        "EURUSD": SERVE, "XAUUSD": SERVE, "XAGUSD": NOT_IN_CATALOG, "XAUEUR": PENDING,
        "XAUJPY": PENDING, "USDCHF": PENDING,
        "USDSEK": (ErrorCode.CAPACITY, REFUSALS["capacity"][1]),
        "USDNOK": (ErrorCode.UNKNOWN_SYMBOL, REFUSALS["unknown"][1]),
        "GBPJPY": NOT_IN_CATALOG,  # it ticked once, but is no longer in the catalogue
    }
    # A refused configured symbol is refused too; without a catalogue only what ticked is served.
    assert judge({"EURUSD": P("e1", 3)}, catalog, {"EURUSD": Verdict("capacity")})["EURUSD"][0] == (
        ErrorCode.CAPACITY)
    assert judge({"EURUSD": P("e", 1), "XAUUSD": None}, None, {}) == {
        "EURUSD": SERVE, "XAUUSD": NOT_IN_CATALOG}


def test_verdicts_round_trip_through_the_hash_and_events() -> None:
    for verdict in (Verdict("capacity"), Verdict("unknown"), Verdict("streaming", P("kX3v_9aQ", 12))):
        assert Verdict.decode(verdict.encode()) == verdict
        event = orjson.loads(symbol_status_event("XAUUSD", verdict))
        assert parse_symbol_status(event) == ("XAUUSD", verdict)
    assert Verdict.decode("streaming") == Verdict("streaming")  # an older leader's: no position
    assert Verdict.decode("bogus") is None and Verdict.decode("capacity:e:1") == Verdict("capacity")
    handover = [("XAUUSD", None), ("USDSEK", 1733000000.5)]
    assert decode_handover(encode_handover(handover)) == handover
    assert decode_handover(b"nope") == [] and decode_handover(b'{"symbols":[[1]]}') == []


def test_book_says_streaming_at_the_first_tick_this_term_and_clears_what_is_dropped() -> None:
    said: list[tuple[str, Verdict | None]] = []
    book = StatusBook(lambda s, v: said.append((s, v)))
    book.want(["EURUSD", "XAUUSD"])
    book.pool_status("XAUUSD", "streaming")  # the vendor accepted it: no tick yet, no verdict
    book.quoted("XAUUSD", P("e1", 41))
    book.quoted("XAUUSD", P("e1", 42))
    book.quoted("GBPUSD", P("e1", 7))  # a late tick of a symbol nobody wants: no verdict
    assert said == [("XAUUSD", Verdict("streaming", P("e1", 41)))]
    book.pool_status("XAUUSD", "capacity")  # a new plan refused it
    book.quoted("XAUUSD", P("e1", 43))  # a tick already on its way changes nothing
    book.pool_status("XAUUSD", "streaming")  # room again: cleared, streaming at its next tick
    book.quoted("XAUUSD", P("e1", 50))
    book.want(["EURUSD"])
    assert said[1:] == [("XAUUSD", Verdict("capacity")), ("XAUUSD", None),
                        ("XAUUSD", Verdict("streaming", P("e1", 50))), ("XAUUSD", None)]


def test_catalog_round_trips_and_nonsense_reads_as_none() -> None:
    catalog = Catalog(("EURUSD", "GBPUSD"), ("XAU*",))
    assert Catalog.decode(catalog.encode()) == catalog
    for raw in (b"nope", b"[]", b'{"static":"EURUSD","on_demand":[]}', b'{"static":[1],"on_demand":[]}'):
        assert Catalog.decode(raw) is None


def test_symbol_status_events_parse_and_others_do_not() -> None:
    event = orjson.loads(symbol_status_event("XAUUSD", Verdict("capacity")))
    assert parse_symbol_status(event) == ("XAUUSD", Verdict("capacity"))
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_watcher_writes_the_catalogue_and_its_state_and_reports_changes() -> None:
    store, clock = MemoryDemandStore(), Clock()
    seen: list[tuple[str, ...]] = []
    watcher = DemandWatcher(store, ["EURUSD"], ["XAU*"], 0.1, seen.append, clock=clock)
    await watcher.poll()
    assert seen == [("EURUSD",)]  # once at the start, then only on change
    assert store.stored_catalog == Catalog(("EURUSD",), ("XAU*",)) and store.stored_handover == []
    await store.publish("edge", {"XAUUSD"}, ttl=15)
    clock.now += 0.25
    await watcher.poll()
    assert seen[-1] == ("EURUSD", "XAUUSD") and store.stored_handover == [("XAUUSD", None)]
    await store.withdraw("edge")
    clock.now += 0.25
    await watcher.poll()  # nobody wants it: the grace starts
    assert len(seen) == 2 and store.stored_handover == [("XAUUSD", 1000.5)]
    clock.now += 0.1
    await watcher.poll()  # grace 0.1 s over
    assert seen[-1] == ("EURUSD",) and len(seen) == 3 and store.stored_handover == []


async def test_watcher_writes_the_catalogue_again_after_it_was_lost() -> None:
    store, clock = MemoryDemandStore(), Clock()
    watcher = DemandWatcher(store, ["EURUSD"], ["XAU*"], 30, lambda wanted: None, clock=clock)
    await watcher.poll()
    store.stored_catalog = None  # a Redis restart without its data
    store.stored_handover = []
    await store.publish("edge", {"XAUUSD"}, ttl=15)
    await watcher.poll()
    store.stored_handover = []
    clock.now += 1.9
    await watcher.poll()
    assert store.stored_catalog is None and store.stored_handover == []  # not due yet
    clock.now += 0.1  # CATALOG_INTERVAL
    await watcher.poll()
    assert store.stored_catalog == Catalog(("EURUSD",), ("XAU*",))
    assert store.stored_handover == [("XAUUSD", None)]


async def test_a_new_leader_keeps_what_the_last_one_streamed_first_and_its_grace() -> None:
    store = MemoryDemandStore()
    # The last leader: USDSEK first wanted, refused (no room); XAUUSD streamed; XAUEUR in its grace.
    await store.write_handover([("USDSEK", None), ("XAUUSD", None), ("XAUEUR", 990.0), ("GBPJPY", None)])
    await store.set_status("USDSEK", Verdict("capacity"))
    await store.set_status("XAUUSD", Verdict("streaming", P("e1", 3)))
    seed = await take_over(store)
    assert seed == [("XAUUSD", None), ("USDSEK", None), ("XAUEUR", 990.0), ("GBPJPY", None)]
    policy = DemandPolicy(["EURUSD"], ["XAU*", "USD???"], grace=30, seed=seed)
    # Newcomers seen together come by name, after the seed; GBPJPY is outside the globs now.
    assert policy.update({"USDSEK", "XAUUSD", "XAUCHF", "XAUAUD"}, 1000.0) == (
        "EURUSD", "XAUUSD", "USDSEK", "XAUEUR", "XAUAUD", "XAUCHF")
    assert policy.update({"USDSEK", "XAUUSD"}, 1019.9)[3] == "XAUEUR"  # its grace runs from 990
    assert "XAUEUR" not in policy.update({"USDSEK", "XAUUSD"}, 1020.0)


async def test_status_reporter_writes_the_hash_then_announces_on_ctl() -> None:
    store, bus = MemoryDemandStore(), MemoryBus()
    events: list[bytes] = []
    sub = bus.subscriber(lambda s, p: None, events.append, lambda up: None)
    sub_task = asyncio.create_task(sub.run())
    reporter = StatusReporter(store, bus)
    task = asyncio.create_task(reporter.run())
    try:
        await asyncio.sleep(0)
        streaming = Verdict("streaming", P("e1", 4))
        reporter.report("XAUUSD", Verdict("capacity"))
        reporter.report("USDSEK", streaming)
        reporter.report("GBPJPY", Verdict("unknown"))
        reporter.report("GBPJPY", None)
        await asyncio.wait_for(reporter.flushed(), 2)
        assert await store.statuses(["XAUUSD", "USDSEK", "GBPJPY"]) == {
            "XAUUSD": Verdict("capacity"), "USDSEK": streaming}
        for _ in range(200):  # the memory bus hands events on in its own task
            if len(events) == 3:
                break
            await asyncio.sleep(0.01)
        assert [parse_symbol_status(orjson.loads(e)) for e in events] == [
            ("XAUUSD", Verdict("capacity")), ("USDSEK", streaming), ("GBPJPY", Verdict("unknown"))]
    finally:
        task.cancel()
        await bus.close()
        await sub_task


async def test_a_reporter_whose_redis_call_swallows_the_cancel_still_stops() -> None:
    # redis-py 8.2 can swallow a cancel that meets a command in flight; the term's end awaits the
    # reporter, so it must stop anyway (before: it waited for the next verdict, for ever).
    class Swallowing(MemoryDemandStore):
        async def set_status(self, symbol: str, verdict: Verdict) -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    reporter = StatusReporter(Swallowing(), MemoryBus())
    task = asyncio.create_task(reporter.run())
    reporter.report("XAUUSD", Verdict("capacity"))
    await asyncio.sleep(0.01)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2.0)
    assert done == {task} and task.cancelled()
