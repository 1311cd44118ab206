"""The witness's own bookkeeping, with synthetic frames: what counts as next, announced,
duplicate or silent gap, and the timings it reports. Fast; no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.witness import Witness


def tick(symbol: str, epoch: str, seq: int, ts: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "tick", "symbol": symbol, "bid": 1.0, "ask": 1.1, "mid": 1.05, "ts": ts,
            "epoch": epoch, "seq": seq, **extra}


def witness(*symbols: str) -> Witness:
    return Witness("ws://127.0.0.1:1/v1/stream", "k", symbols or ("EURUSD",))


def test_consecutive_ticks_per_symbol_are_clean_even_interleaved() -> None:
    w = witness("EURUSD", "GBPUSD")
    for i, (sym, seq) in enumerate([("EURUSD", 7), ("GBPUSD", 100), ("EURUSD", 8), ("GBPUSD", 101)]):
        w.feed(tick(sym, "e1", seq), float(i))
    assert (w.silent_gaps, w.duplicates, w.announced) == ([], [], 0)
    assert w.last("EURUSD") == ("e1", 8) and w.last("GBPUSD") == ("e1", 101)


def test_a_jump_without_announcement_is_a_silent_gap_with_both_positions() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 1), 0.0)
    w.feed(tick("EURUSD", "e1", 4), 1.0)
    assert [(f.symbol, f.before, f.after) for f in w.silent_gaps] == [("EURUSD", ("e1", 1), ("e1", 4))]
    w.feed(tick("EURUSD", "e1", 5), 2.0)  # and it continues from the new position
    assert len(w.silent_gaps) == 1


def test_an_epoch_change_without_reset_is_a_silent_gap() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.feed(tick("EURUSD", "e2", 1), 1.0)
    assert len(w.silent_gaps) == 1 and w.announced == 0


def test_a_reset_announces_the_next_discontinuity_of_its_symbol_only() -> None:
    w = witness("EURUSD", "GBPUSD")
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.feed(tick("GBPUSD", "e1", 10), 0.0)
    w.feed({"type": "reset", "symbol": "EURUSD", "epoch": "e2", "reason": "history lost"}, 1.0)
    w.feed(tick("GBPUSD", "e1", 12), 1.1)  # not announced for GBPUSD
    w.feed(tick("EURUSD", "e2", 1), 1.2)
    w.feed(tick("EURUSD", "e2", 3), 1.3)  # the reset covered one jump, not this one
    assert (w.resets, w.announced) == (1, 1)
    assert [(f.symbol, f.after) for f in w.silent_gaps] == [("GBPUSD", ("e1", 12)), ("EURUSD", ("e2", 3))]


def test_recovered_false_announces_the_snapshot_jump() -> None:
    w = witness("EURUSD", "GBPUSD")
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.feed(tick("GBPUSD", "e1", 5), 0.0)
    frame = w.subscribe_frame()
    assert frame["since"] == {"EURUSD": {"epoch": "e1", "seq": 10}, "GBPUSD": {"epoch": "e1", "seq": 5}}
    w.feed({"type": "subscribed", "id": frame["id"], "symbols": ["EURUSD", "GBPUSD"],
            "recovered": {"EURUSD": False, "GBPUSD": True}}, 1.0)
    w.feed(tick("EURUSD", "e1", 50, snapshot=True), 1.1)
    w.feed(tick("GBPUSD", "e1", 6), 1.1)
    assert (w.announced, w.silent_gaps, w.duplicates, w.anomalies) == (1, [], [], [])
    assert [(s, ok) for _, s, ok in w.recoveries] == [("EURUSD", False), ("GBPUSD", True)]


def test_a_resume_without_recovered_flag_is_an_anomaly() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.subscribe_frame()
    w.feed({"type": "subscribed", "id": 1, "symbols": ["EURUSD"]}, 1.0)
    assert len(w.anomalies) == 1


@pytest.mark.parametrize("again", [
    tick("EURUSD", "e1", 10),  # the same tick again
    tick("EURUSD", "e1", 9),  # an older one
    tick("EURUSD", "e1", 10, snapshot=True),  # a snapshot of what it already has
])
def test_a_position_at_or_before_the_last_is_a_duplicate(again: dict[str, Any]) -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.feed(again, 1.0)
    assert len(w.duplicates) == 1 and w.last("EURUSD") == ("e1", 10)
    w.feed(tick("EURUSD", "e1", 11), 2.0)  # the stream goes on from where it was
    assert w.silent_gaps == []


def test_a_snapshot_at_the_last_position_is_a_duplicate_even_after_recovered_false() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.subscribe_frame()
    w.feed({"type": "subscribed", "id": 1, "symbols": ["EURUSD"], "recovered": {"EURUSD": False}}, 1.0)
    w.feed(tick("EURUSD", "e1", 10, snapshot=True), 1.1)
    assert len(w.duplicates) == 1


def test_a_tick_of_an_epoch_already_left_is_a_duplicate() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 10), 0.0)
    w.feed({"type": "reset", "symbol": "EURUSD", "epoch": "e2", "reason": "x"}, 0.5)
    w.feed(tick("EURUSD", "e2", 1), 1.0)
    w.feed(tick("EURUSD", "e1", 11), 2.0)
    assert len(w.duplicates) == 1 and w.silent_gaps == []


def test_first_tick_of_a_symbol_may_start_anywhere() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e9", 12345, snapshot=True), 0.0)
    assert (w.silent_gaps, w.duplicates, w.announced) == ([], [], 0)


def test_unavailable_error_asks_for_a_resubscribe_other_errors_are_anomalies() -> None:
    w = witness()
    w.feed({"type": "error", "id": 1, "code": "unavailable", "message": "retry"}, 0.0)
    assert w._retry_subscribe and w.anomalies == []
    w.feed({"type": "error", "id": 2, "code": "bad_request", "message": "no"}, 0.0)
    w.feed({"type": "mystery"}, 0.0)
    assert len(w.anomalies) == 2


def test_pauses_and_time_to_flow() -> None:
    w = witness("EURUSD", "GBPUSD")
    for t, (sym, seq) in zip([0.0, 0.1, 0.2, 3.2, 3.3], [("EURUSD", 1), ("GBPUSD", 1), ("EURUSD", 2),
                                                          ("GBPUSD", 2), ("EURUSD", 3)], strict=True):
        w.feed(tick(sym, "e1", seq), t)
    assert w.longest_pause() == pytest.approx(3.0)
    assert w.longest_pause(start=3.0) == pytest.approx(0.1)
    assert w.time_to_flow(1.0) == pytest.approx(2.2)
    assert w.time_to_flow(3.3) is None
    assert w.stale_symbols(now=3.5, max_age=0.25) == ["GBPUSD"]


def test_duplicates_do_not_count_as_flow() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 5), 0.0)
    w.feed(tick("EURUSD", "e1", 5), 1.0)
    w.feed(tick("EURUSD", "e1", 6), 2.0)
    assert w.time_to_flow(0.5) == pytest.approx(1.5)


def test_fresh_flow_ignores_ticks_made_before_the_moment() -> None:
    w = witness()

    def wall_ms(t: float) -> int:
        return int((t + w.wall_offset) * 1000)

    w.feed(tick("EURUSD", "e1", 1, ts=wall_ms(9.99)), 10.01)  # in flight when the fault struck
    w.feed(tick("EURUSD", "e1", 2, ts=wall_ms(10.5)), 12.0)  # made after it, queued, then sent
    assert w.time_to_flow(10.0) == pytest.approx(0.01)
    assert w.time_to_flow(10.0, fresh=True) == pytest.approx(2.0)


def test_connects_and_closes_are_counted() -> None:
    w = witness()
    w.note_connected(0.0, "ws://a")
    w.note_closed(1.0, 1001, "draining")
    w.note_connect_failed(1.1, "ws://a", "refused")
    w.note_connected(1.2, "ws://b")
    assert w.reconnects == 1 and w.closes == [(1.0, 1001, "ws://a")] and w.url == "ws://b"


def test_seen_maps_each_taken_position_to_its_price() -> None:
    w = witness()
    w.feed(tick("EURUSD", "e1", 1, ts=5), 0.0)
    w.feed(tick("EURUSD", "e1", 1, ts=6), 0.1)  # a duplicate is not a position taken
    assert w.seen() == {("EURUSD", "e1", 1): (5, 1.0, 1.1)}
