"""Vendor limits without a vendor: packing symbols on sessions, refusing the excess (static
symbols first), unknown symbols taken off, and readiness, with sessions that only record."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from ingestor import metrics
from ingestor import pool as pool_module
from ingestor.packing import plan
from ingestor.pool import UpstreamPool
from ingestor.vendors.base import SILENT
from shared.settings import IngestorSettings
from tests.support.upstream import FakeSession, fake_sessions, settings, settle

F = frozenset


def test_symbols_fill_open_sessions_before_a_new_one_opens() -> None:
    layout = plan([], ["A", "B", "C", "D", "E"], per_session=3, max_sessions=3)
    assert [len(s) for s in layout.sessions] == [3, 2, 0]
    assert set().union(*layout.sessions) == {"A", "B", "C", "D", "E"}
    assert layout.refused == ()


def test_unlimited_sessions_carry_everything_on_one() -> None:
    layout = plan([], [f"S{i:03}" for i in range(500)], per_session=0, max_sessions=4)
    assert len(layout.sessions) == 1 and len(layout.sessions[0]) == 500


def test_excess_over_symbols_times_sessions_is_refused_in_priority_order() -> None:
    wanted = [f"S{i:03}" for i in range(8)]
    layout = plan([], wanted, per_session=3, max_sessions=2)
    assert layout.refused == ("S006", "S007")
    assert set().union(*layout.sessions) == set(wanted[:6])


def test_symbols_that_stay_stay_on_their_session() -> None:
    before = plan([], ["A", "B", "C", "D", "E"], per_session=3, max_sessions=2).sessions
    after = plan(before, ["A", "B", "C", "D", "E", "F"], per_session=3, max_sessions=2).sessions
    for old, new in zip(before, after, strict=True):
        assert old <= new  # nothing moved, F went where there was room
    assert after[0] | after[1] == F("ABCDEF")


def test_a_session_whose_symbols_fit_elsewhere_is_emptied() -> None:
    current = [F({"A", "B"}), F({"C", "D"})]
    layout = plan(current, ["A", "C", "D"], per_session=3, max_sessions=2)
    # The session left with fewer symbols (A) moves them: one symbol moves, not two.
    assert layout.sessions == (F(), F({"A", "C", "D"}))


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[FakeSession]:
    return fake_sessions(monkeypatch)


@contextlib.asynccontextmanager
async def running(pool: UpstreamPool) -> AsyncIterator[None]:
    task = asyncio.create_task(pool.run())
    await settle()
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_pool_refuses_capacity_excess_and_static_symbols_go_first(sessions: list[FakeSession]) -> None:
    statuses: list[tuple[str, str]] = []
    pool = UpstreamPool(settings("EURUSD,GBPUSD,USDJPY", 2, 2), lambda q: None,
                        lambda s, st: statuses.append((s, st)))
    pool.want(["AUDUSD", "EURUSD", "GBPUSD", "USDJPY", "NZDUSD"])  # 5 wanted, room for 4
    async with running(pool):
        assert len(sessions) == 2
        assert pool.streamed() == {"EURUSD", "GBPUSD", "USDJPY", "AUDUSD"}
        assert statuses == [("NZDUSD", "capacity")]
        assert metrics.UPSTREAM_SYMBOLS._value.get() == 4
        # A newcomer does not push out an on-demand symbol already streamed.
        pool.want(["AUDUSD", "EURUSD", "GBPUSD", "USDJPY", "CADJPY"])
        await settle()
        assert pool.streamed() == {"EURUSD", "GBPUSD", "USDJPY", "AUDUSD"}
        assert ("CADJPY", "capacity") in statuses
        # Demand going away makes room.
        pool.want(["EURUSD", "GBPUSD", "USDJPY", "CADJPY"])
        await settle()
        assert pool.streamed() == {"EURUSD", "GBPUSD", "USDJPY", "CADJPY"}
    assert all(s.closed for s in sessions)


async def test_on_demand_symbols_keep_the_order_first_wanted_in(sessions: list[FakeSession]) -> None:
    # A new leader has streamed nothing yet: with room for one on-demand symbol, the one wanted
    # first gets it, not the alphabetically first.
    statuses: list[tuple[str, str]] = []
    pool = UpstreamPool(settings("EURUSD", 2, 1), lambda q: None, lambda s, st: statuses.append((s, st)))
    pool.want(["EURUSD", "XAUUSD", "AUDUSD"])
    async with running(pool):
        assert pool.streamed() == {"EURUSD", "XAUUSD"}
        assert statuses == [("AUDUSD", "capacity")]


async def test_vendor_statuses_are_forwarded_once_and_unknown_symbols_lose_their_place(
        sessions: list[FakeSession]) -> None:
    statuses: list[tuple[str, str]] = []
    pool = UpstreamPool(settings("EURUSD,NOSUCH", 0, 1), lambda q: None,
                        lambda s, st: statuses.append((s, st)))
    pool.want(["EURUSD", "NOSUCH"])
    async with running(pool):
        (session,) = sessions
        for _ in range(3):  # e.g. three re-logins: said again each time by the vendor
            session.hooks.on_status("EURUSD", "streaming")
        session.hooks.on_status("NOSUCH", "unknown")
        await settle()
        assert statuses == [("EURUSD", "streaming"), ("NOSUCH", "unknown")]
        assert session.symbols == {"EURUSD"} and pool.streamed() == {"EURUSD"}


async def test_ready_only_while_every_session_with_symbols_is_logged_in(sessions: list[FakeSession]) -> None:
    connected = asyncio.Event()
    pool = UpstreamPool(settings("A00,B00,C00", 2, 2), lambda q: None, lambda s, st: None,
                        connected=connected)
    pool.want(["A00", "B00", "C00"])
    async with running(pool):
        first, second = sessions
        first.login()
        assert not connected.is_set()
        second.login()
        assert connected.is_set()
        second.up = False
        second.hooks.on_link()
        assert not connected.is_set()
    assert not connected.is_set()


async def test_a_symbol_the_dialect_cannot_name_is_unknown_at_once(sessions: list[FakeSession]) -> None:
    statuses: list[tuple[str, str]] = []
    pool = UpstreamPool(settings("EURUSD", 0, 1), lambda q: None, lambda s, st: statuses.append((s, st)))
    pool.want(["EURUSD", "9433@1"])
    async with running(pool):
        assert statuses == [("9433@1", "unknown")]
        assert [s.symbols for s in sessions] == [{"EURUSD"}]


@pytest.mark.parametrize(("env", "says"), [
    ({"upstream_max_symbols": 51}, "at most 50"),
    ({"symbols": "EURUSD"}, "code@exchange"),
    ({"upstream_max_connections": 2}, "one kabuステーション each"),
])
def test_kabu_limits_that_cannot_work_fail_at_start(env: dict[str, object], says: str) -> None:
    fields: dict[str, object] = {"upstream_dialect": "kabu", "symbols": "9433@1",
                                 "upstream_urls": "http://127.0.0.1:18080/kabusapi", **env}
    with pytest.raises(ValueError, match=says):
        IngestorSettings(**fields)  # type: ignore[arg-type]
    assert IngestorSettings(upstream_dialect="kabu").symbols_per_session() == 50


async def test_a_failing_session_is_reopened_after_its_backoff_and_the_others_stream_on(
        sessions: list[FakeSession], caplog: pytest.LogCaptureFixture) -> None:
    connected = asyncio.Event()
    pool = UpstreamPool(settings("A00,B00,C00", 2, 2, backoff_initial=0.2, backoff_max=1.0),
                        lambda q: None, lambda s, st: None, connected=connected)
    pool.want(["A00", "B00", "C00"])
    before = metrics.SESSION_FAILURES._value.get()
    loop = asyncio.get_running_loop()
    async with running(pool):
        first, second = sessions
        first.login()
        second.login()
        assert connected.is_set()
        second.fail()
        failed_at = loop.time()
        await settle()
        assert not connected.is_set()  # its symbols are not streaming: not ready
        assert len(sessions) == 2 and not first.closed and first.changes == []
        pool.want(["A00", "B00", "C00", "D00"])  # a change meanwhile reaches the reopened session
        await settle()
        while len(sessions) < 3:
            assert loop.time() - failed_at < 3.0, "the failed session was not reopened"
            await asyncio.sleep(0.01)
        took = loop.time() - failed_at
        third = sessions[2]
        third.login()
        assert connected.is_set()
    print(f"\nfailed session reopened after {took:.2f}s (backoff 0.1-0.2 s)")
    # Full jitter between half the first delay and all of it, plus a loaded machine's slack.
    assert 0.09 <= took < 3.0
    assert third.slot == 1 and third.symbols == {"C00", "D00"} and first.symbols == {"A00", "B00"}
    assert metrics.SESSION_FAILURES._value.get() - before == 1
    failure = next(r for r in caplog.records if r.getMessage() == "upstream session failed: reopening it")
    assert failure.exc_info is not None and failure.exc_info[0] is KeyError  # the traceback is logged


async def test_silence_never_makes_a_configured_symbol_unknown_and_unknowns_are_forgotten_when_dropped(
        sessions: list[FakeSession]) -> None:
    statuses: list[tuple[str, str]] = []
    pool = UpstreamPool(settings("EURUSD", 0, 1), lambda q: None, lambda s, st: statuses.append((s, st)))
    pool.want(["EURUSD", "XAUUSD", "NOSUCH"])
    async with running(pool):
        (session,) = sessions
        for symbol in ("EURUSD", "XAUUSD"):
            session.hooks.on_status(symbol, SILENT)
        session.hooks.on_status("NOSUCH", "unknown")  # the vendor's own notice
        await settle()
        assert statuses == [("XAUUSD", "unknown"), ("NOSUCH", "unknown")]
        assert session.symbols == {"EURUSD"}  # the configured one keeps its place
        pool.want(["EURUSD"])  # both dropped (the grace ran out) ...
        await settle()
        pool.want(["EURUSD", "XAUUSD", "NOSUCH"])  # ... and called up again: tried afresh
        await settle()
        assert session.symbols == {"EURUSD", "XAUUSD", "NOSUCH"}
        session.hooks.on_status("XAUUSD", SILENT)
        await settle()
        assert statuses[2:] == [("XAUUSD", "unknown")] and session.symbols == {"EURUSD", "NOSUCH"}


def test_a_symbol_is_never_placed_on_a_slot_the_vendor_had_no_room_on() -> None:
    current = [F({"A", "B"}), F()]
    # B had no room on slot 0's vendor: it moves to slot 1, C fills the place left on slot 0.
    layout = plan(current, ["A", "B", "C"], per_session=3, max_sessions=2, excluded={"B": [0]})
    assert layout.sessions == (F({"A", "C"}), F({"B"})) and layout.refused == ()
    # Compacting does not move it back either; with no other slot it is refused.
    layout = plan([F({"A"}), F({"B"})], ["A", "B"], per_session=3, max_sessions=2, excluded={"B": [0]})
    assert layout.sessions == (F({"A"}), F({"B"}))
    layout = plan([F({"A", "B"})], ["A", "B", "C"], per_session=3, max_sessions=1, excluded={"B": [0]})
    assert layout.sessions == (F({"A", "C"}),) and layout.refused == ("B",)


async def test_vendor_capacity_moves_a_symbol_to_a_session_with_room_and_retries_on_a_timer(
        sessions: list[FakeSession], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "CAPACITY_RETRY", 0.3)
    statuses: list[tuple[str, str]] = []
    pool = UpstreamPool(settings("S03,S01,S02", 3, 2), lambda q: None, lambda s, st: statuses.append((s, st)))
    pool.want(["S03", "S01", "S02", "D01"])
    loop = asyncio.get_running_loop()
    async with running(pool):
        first, second = sessions
        # Sessions get their symbols in priority order: configured ones as configured, then demand.
        assert first.order == ["S03", "S01", "S02"] and second.order == ["D01"]
        held_out_at = loop.time()
        first.hooks.on_status("S02", "capacity")  # another app holds the rest of slot 0's list
        await settle()
        assert first.symbols == {"S03", "S01"} and second.symbols == {"D01", "S02"}
        assert statuses == []  # it found room: not refused
        second.hooks.on_status("S02", "capacity")  # no room there either: refused
        await settle()
        assert statuses == [("S02", "capacity")] and "S02" not in pool.streamed()
        while "S02" not in pool.streamed():  # asked for again with no change to the wanted set
            assert loop.time() - held_out_at < 3.0, "a vendor-refused symbol was never retried"
            await asyncio.sleep(0.01)
        took = loop.time() - held_out_at
        assert "S02" in first.symbols | second.symbols
    print(f"\nvendor-refused symbol asked for again {took:.2f}s after its first refusal (retry 0.3 s)")
    assert 0.29 <= took < 3.0  # the timer, less the pool's 10 ms slack for early wake-ups
