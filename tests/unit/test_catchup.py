"""Catch-up on subscribe: a snapshot, or an exact replay after `since`, never a hole or a duplicate."""

from __future__ import annotations

import orjson

from edge.catchup import catch_up
from edge.protocol import Since
from shared.tick import Position, Tick, encode_tick


def tick(seq: int, epoch: str = "e1") -> bytes:
    return encode_tick(Tick("EURUSD", 1.1, 1.2, 1.15, 1, epoch, seq))


def live(seq: int, epoch: str = "e1") -> tuple[Position, bytes]:
    return Position(epoch, seq), tick(seq, epoch)


def seqs(frames: list[bytes]) -> list[int]:
    return [orjson.loads(f)["seq"] for f in frames]


def test_unknown_symbol_has_no_catch_up() -> None:
    assert catch_up(None, None, None, None, 100, 10_000) is None


def test_snapshot_is_the_newer_of_the_edge_and_redis() -> None:
    plan = catch_up(None, live(5), tick(7), None, 100, 10_000)
    assert plan is not None and plan.position == Position("e1", 7) and plan.recovered is None
    assert orjson.loads(plan.frames[0])["snapshot"] is True
    plan = catch_up(None, live(9), tick(7), None, 100, 10_000)
    assert plan is not None and plan.position == Position("e1", 9)


def test_on_an_epoch_mismatch_the_edge_stream_is_followed() -> None:
    plan = catch_up(None, live(3, "e1"), tick(1, "e2"), None, 100, 10_000)
    assert plan is not None and plan.position == Position("e1", 3)


def test_resume_with_nothing_missed_sends_nothing() -> None:
    plan = catch_up(Since("e1", 7), live(7), tick(7), [], 100, 10_000)
    assert plan is not None and plan.frames == [] and plan.recovered is True


def test_resume_replays_exactly_the_missed_ticks() -> None:
    history = [tick(s) for s in (4, 5, 6, 7)]
    plan = catch_up(Since("e1", 3), live(6), tick(7), history, 100, 10_000)
    assert plan is not None and plan.recovered is True
    assert seqs(plan.frames) == [4, 5, 6, 7] and plan.position == Position("e1", 7)
    bare = catch_up(Since(None, 3), live(6), tick(7), history, 100, 10_000)
    assert bare is not None and bare.recovered is True and seqs(bare.frames) == [4, 5, 6, 7]


def test_recovery_is_all_or_nothing() -> None:
    cases = {
        "other epoch": (Since("e0", 3), [tick(s) for s in (4, 5, 6, 7)]),
        "hole in history": (Since("e1", 3), [tick(s) for s in (4, 6, 7)]),
        "history trimmed": (Since("e1", 3), [tick(s) for s in (5, 6, 7)]),
        "history lost": (Since("e1", 3), []),
        "beyond the stream": (Since("e1", 9), []),
        "over the replay limit": (Since("e1", 1), [tick(s) for s in range(2, 8)]),
    }
    for name, (since, history) in cases.items():
        plan = catch_up(since, live(7), tick(7), history, 5, 10_000)
        assert plan is not None, name
        assert plan.recovered is False, name
        assert len(plan.frames) == 1 and orjson.loads(plan.frames[0])["snapshot"], name
        assert plan.position == Position("e1", 7), name


def test_a_replay_over_the_byte_budget_is_refused_not_queued() -> None:
    history = [tick(s) for s in range(4, 8)]
    plan = catch_up(Since("e1", 3), live(7), None, history, 100, 2 * len(history[0]))
    assert plan is not None and plan.recovered is False and len(plan.frames) == 1


def test_history_that_stops_before_the_edge_asks_for_another_read() -> None:
    plan = catch_up(Since("e1", 3), live(9), tick(7), [tick(s) for s in (4, 5, 6, 7)], 100, 10_000)
    assert plan is not None and plan.short and plan.recovered is False


def test_a_history_read_the_stream_outran_is_completed_from_the_edges_recent_ticks() -> None:
    history = [tick(s) for s in (4, 5, 6)]  # read while the edge went on to 9
    recent = [tick(s) for s in (5, 6, 7, 8, 9)]
    plan = catch_up(Since("e1", 3), live(9), tick(6), history + recent, 100, 10_000)
    assert plan is not None and plan.recovered is True and seqs(plan.frames) == [4, 5, 6, 7, 8, 9]
