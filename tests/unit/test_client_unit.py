"""The client library's sans-I/O parts: position bookkeeping and frame handling."""

from __future__ import annotations

import orjson
import pytest

from fxproxy.client import Anomaly, Client, Error, Positions, Reset, Subscribed, Tick, Unauthorized


def test_contiguous_ticks_are_delivered_without_anomaly() -> None:
    p = Positions()
    assert [p.tick("EURUSD", "e1", s) for s in (5, 6, 7)] == [(True, None)] * 3
    assert p.since(["EURUSD", "GBPUSD"]) == {"EURUSD": {"epoch": "e1", "seq": 7}}
    assert p.anomalies == 0


def test_unannounced_gap_is_an_anomaly_but_still_delivered() -> None:
    p = Positions()
    p.tick("EURUSD", "e1", 5)
    assert p.tick("EURUSD", "e1", 8) == (True, Anomaly("EURUSD", "gap", ("e1", 5), ("e1", 8)))
    assert p.anomalies == 1 and p.last["EURUSD"] == ("e1", 8)


@pytest.mark.parametrize("seq", [5, 4])
def test_duplicate_is_an_anomaly_and_is_not_delivered(seq: int) -> None:
    p = Positions()
    p.tick("EURUSD", "e1", 5)
    assert p.tick("EURUSD", "e1", seq) == (False, Anomaly("EURUSD", "duplicate", ("e1", 5), ("e1", seq)))
    assert p.last["EURUSD"] == ("e1", 5) and p.anomalies == 1


def test_announced_reset_lets_the_next_tick_jump_once() -> None:
    p = Positions()
    p.tick("EURUSD", "e1", 5)
    p.announce("EURUSD")
    assert p.tick("EURUSD", "e2", 1) == (True, None)
    assert p.tick("EURUSD", "e2", 3)[1] is not None  # the announcement covers one jump only
    assert p.anomalies == 1


def test_conflated_tick_may_skip_seqs() -> None:
    p = Positions()
    p.tick("EURUSD", "e1", 5)
    assert p.tick("EURUSD", "e1", 40, conflated=True) == (True, None)
    assert p.tick("EURUSD", "e1", 40, conflated=True)[0] is False  # but never go back


def test_epoch_change_without_reset_is_an_anomaly() -> None:
    p = Positions()
    p.tick("EURUSD", "e1", 5)
    assert p.tick("EURUSD", "e2", 1) == (True, Anomaly("EURUSD", "epoch", ("e1", 5), ("e2", 1)))
    assert p.tick("EURUSD", "e2", 2) == (True, None)


def test_symbols_are_tracked_independently() -> None:
    p = Positions()
    p.tick("EURUSD", "e1", 5)
    assert p.tick("GBPUSD", "e9", 100) == (True, None)
    assert p.tick("EURUSD", "e1", 6) == (True, None)


def frame(obj: object) -> bytes:
    return orjson.dumps(obj)


def test_handle_keeps_raw_frame_and_announces_not_recovered() -> None:
    c = Client("ws://127.0.0.1:1/v1/stream", "k", ["EURUSD", "GBPUSD"])
    raw = b'{"type":"tick","symbol":"EURUSD","bid":1.1,"ask":1.2,"mid":1.15,"ts":7,"epoch":"e","seq":3}'
    [tick] = c.handle(raw)
    assert isinstance(tick, Tick) and tick.raw == raw and tick.seq == 3 and not tick.snapshot
    events = c.handle(frame({"type": "subscribed", "symbols": ["EURUSD"], "recovered": {"EURUSD": False}}))
    assert events == [Subscribed(("EURUSD",), {"EURUSD": False}), Reset("EURUSD", None, "not recovered")]
    [again] = c.handle(raw.replace(b'"seq":3', b'"seq":1'))  # fresh snapshot: no anomaly
    assert isinstance(again, Tick) and c.positions.anomalies == 0


def test_handle_reset_error_and_forbidden_symbols_are_not_resubscribed() -> None:
    c = Client(["ws://a/v1/stream", "ws://b/v1/stream"], "k", ["EURUSD", "GBPUSD"])
    assert c.handle(frame({"type": "reset", "symbol": "EURUSD", "epoch": "n", "reason": "r"})) == [
        Reset("EURUSD", "n", "r")]
    assert "EURUSD" in c.positions.announced
    err = c.handle(frame({"type": "error", "code": "forbidden_symbol", "message": "no",
                          "symbols": ["GBPUSD"]}))
    assert err == [Error("forbidden_symbol", "no", ("GBPUSD",))] and c.symbols == ["EURUSD"]


def test_pending_symbols_are_reported_and_capacity_is_asked_for_again() -> None:
    c = Client("ws://127.0.0.1:1/v1/stream", "k", ["EURUSD", "XAUUSD"])
    events = c.handle(frame({"type": "subscribed", "symbols": ["EURUSD", "XAUUSD"], "pending": ["XAUUSD"]}))
    assert events == [Subscribed(("EURUSD", "XAUUSD"), {}, ("XAUUSD",))]
    err = c.handle(frame({"type": "error", "code": "capacity", "message": "full", "symbols": ["XAUUSD"]}))
    assert err == [Error("capacity", "full", ("XAUUSD",))] and c.symbols == ["EURUSD", "XAUUSD"]


def test_a_pending_resume_starts_afresh_without_an_anomaly() -> None:
    # The symbol is not streamed now: the edge sends no snapshot and says the resume failed; the
    # stream picks up later at whatever seq the leader continues with.
    c = Client("ws://127.0.0.1:1/v1/stream", "k", ["XAUUSD"])
    c.handle(frame({"type": "tick", "symbol": "XAUUSD", "bid": 1, "ask": 2, "ts": 1, "epoch": "e", "seq": 5}))
    events = c.handle(frame({"type": "subscribed", "symbols": ["XAUUSD"], "pending": ["XAUUSD"],
                             "recovered": {"XAUUSD": False}}))
    assert events == [Subscribed(("XAUUSD",), {"XAUUSD": False}, ("XAUUSD",)),
                      Reset("XAUUSD", None, "not recovered")]
    [tick] = c.handle(frame({"type": "tick", "symbol": "XAUUSD", "bid": 1, "ask": 2, "ts": 9,
                             "epoch": "e", "seq": 90}))
    assert isinstance(tick, Tick) and tick.seq == 90 and c.positions.anomalies == 0


def test_tradermade_ticks_have_no_position_and_bad_key_stops() -> None:
    c = Client("ws://127.0.0.1:1/feedadv", "k", ["EURUSD"])
    [tick] = c.handle(b'{"symbol":"EURUSD","ts":"17","bid":1.0,"ask":1.2,"mid":1.1}')
    assert isinstance(tick, Tick) and tick.ts == 17 and tick.seq is None
    with pytest.raises(Unauthorized):
        c.handle(b"Invalid user key")


def test_tail_table_shows_change_rate_seq_and_age_per_symbol() -> None:
    from fxproxy.client import State
    from fxproxy.tail import Table

    table = Table(["EURUSD", "GBPUSD"])
    table.update(Tick("EURUSD", 1.0, 1.2, 1.1, 1_000_000, "e", 5, True, False, b""), 0.5)
    table.update(Tick("EURUSD", 1.1, 1.3, 1.21, 1_000_500, "e", 6, False, False, b""), 1.0)
    table.event(State("reconnecting", "ws://x", 0.1, "closed 1006"))
    header, eurusd, gbpusd, status = table.render(now=2.0, wall=1002.0)
    assert header.split()[0] == "symbol"
    assert eurusd.split() == ["EURUSD", "1.1", "1.3", "+10.000%", "1.0", "6", "1.5s"]
    assert gbpusd.split() == ["GBPUSD", "-", "-"]
    assert "reconnects 1" in status and "closed 1006" in status
