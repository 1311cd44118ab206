"""The hub: one frame for all, duplicates dropped, gaps repaired from history or announced."""

from __future__ import annotations

import asyncio

import orjson

from edge.hub import Hub
from shared.tick import Position, Tick, encode_tick, position_of


class Recorder:
    """Stands in for a client's Writer; records what it is handed."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_tick(self, symbol: str, frame: bytes) -> None:
        self.frames.append(frame)

    def send(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def forget(self, symbol: str) -> None:
        pass

    @property
    def seen(self) -> list[object]:
        """seqs of ticks, ('reset', reason) for resets."""
        out: list[object] = []
        for f in self.frames:
            msg = orjson.loads(f[2:])
            out.append(msg["seq"] if msg["type"] == "tick" else ("reset", msg["epoch"]))
        return out


def tick(seq: int, epoch: str = "e1", symbol: str = "EURUSD") -> bytes:
    return encode_tick(Tick(symbol, 1.1, 1.2, 1.15, 1, epoch, seq))


class History:
    def __init__(self, *seqs: int, epoch: str = "e1", delay: float = 0.0) -> None:
        self.entries = [tick(s, epoch) for s in seqs]
        self.calls: list[tuple[int, int]] = []
        self.delay = delay

    async def __call__(self, symbol: str, after: int, limit: int) -> list[bytes]:
        self.calls.append((after, limit))
        await asyncio.sleep(self.delay)
        return [p for p in self.entries if orjson.loads(p)["seq"] > after][:limit]


async def hub_with(history: History, *writers: Recorder, start: int = 1) -> Hub:
    hub = Hub(history, repair_timeout=0.2)
    hub.acquire(["EURUSD"])
    for w in writers:
        hub.attach(w, "EURUSD", Position("e1", start), tick(start))  # type: ignore[arg-type]
    return hub


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_every_subscriber_gets_the_same_frame_object() -> None:
    a, b = Recorder(), Recorder()
    hub = await hub_with(History(), a, b)
    hub.on_tick("EURUSD", tick(2))
    assert a.frames[0] is b.frames[0]


async def test_duplicates_are_dropped() -> None:
    a = Recorder()
    hub = await hub_with(History(), a)
    for seq in (2, 2, 1, 3, 3):
        hub.on_tick("EURUSD", tick(seq))
    assert a.seen == [2, 3]


async def test_a_gap_is_filled_from_history_before_later_ticks_go_out() -> None:
    a = Recorder()
    history = History(2, 3, 4)
    hub = await hub_with(history, a)
    hub.on_tick("EURUSD", tick(4))  # 2 and 3 were lost on the way
    hub.on_tick("EURUSD", tick(5))  # arrives while history is read: held
    assert a.seen == []
    await settle()
    assert history.calls == [(1, 1000)]
    assert a.seen == [2, 3, 4, 5]


async def test_a_gap_history_cannot_fill_is_announced_with_a_reset() -> None:
    a = Recorder()
    hub = await hub_with(History(3), a)  # history lost seq 2
    hub.on_tick("EURUSD", tick(4))
    await settle()
    assert a.seen == [("reset", "e1"), 3, 4]


async def test_what_history_holds_after_a_hole_still_goes_out_after_the_reset() -> None:
    a = Recorder()
    hub = await hub_with(History(2, 5, 6), a)  # history lost 3 and 4
    hub.on_tick("EURUSD", tick(6))
    hub.on_tick("EURUSD", tick(7))
    await settle()
    assert a.seen == [2, ("reset", "e1"), 5, 6, 7]


async def test_a_hung_history_read_ends_in_a_reset_after_the_repair_timeout() -> None:
    a = Recorder()
    hub = await hub_with(History(2, delay=5), a)
    hub.on_tick("EURUSD", tick(3))
    await asyncio.sleep(0.3)
    assert a.seen == [("reset", "e1"), 3]


async def test_a_failed_history_read_is_retried_within_the_repair_timeout() -> None:
    """Just after a cluster failover the first read may go to the node that died: a quiet
    symbol, which ticks no more, is refilled by the retry or never."""
    class Flaky(History):
        async def __call__(self, symbol: str, after: int, limit: int) -> list[bytes]:
            if not self.calls:
                self.calls.append((after, limit))
                raise ConnectionError("the old primary")
            return await super().__call__(symbol, after, limit)

    a = Recorder()
    history = Flaky(2, 3)
    hub = await hub_with(history, a)
    hub.recover()
    await asyncio.sleep(0.15)
    assert len(history.calls) == 2
    assert a.seen == [2, 3]  # no reset: the retry filled it


async def test_a_new_epoch_is_announced_before_its_first_tick() -> None:
    a = Recorder()
    hub = await hub_with(History(), a)
    hub.on_tick("EURUSD", tick(2))
    hub.on_tick("EURUSD", tick(1, epoch="e2"))
    hub.on_tick("EURUSD", tick(2, epoch="e2"))
    assert a.seen == [2, ("reset", "e2"), 1, 2]


async def test_after_a_bus_reconnect_missed_ticks_are_replayed_before_held_live_ones() -> None:
    a = Recorder()
    history = History(2, 3, 4)
    hub = await hub_with(history, a)
    hub.recover()
    hub.on_tick("EURUSD", tick(4))  # live, while history is read
    hub.on_tick("EURUSD", tick(5))
    await settle()
    assert a.seen == [2, 3, 4, 5]


async def test_recovering_some_symbols_reads_history_for_those_alone() -> None:
    """On a cluster only the lost shard's symbols are refilled: the others lost nothing."""
    read: list[str] = []

    async def history(symbol: str, after: int, limit: int) -> list[bytes]:
        read.append(symbol)
        return [tick(2, symbol=symbol)]

    a = Recorder()
    hub = Hub(history, repair_timeout=0.2)
    hub.acquire(["EURUSD", "GBPUSD", "USDJPY"])
    for symbol in ("EURUSD", "GBPUSD", "USDJPY"):
        hub.attach(a, symbol, Position("e1", 1), tick(1, symbol=symbol))  # type: ignore[arg-type]
    hub.recover(["GBPUSD", "AUDUSD"])  # AUDUSD: not held here (any more)
    await settle()
    assert read == ["GBPUSD"]
    assert a.seen == [2]


async def test_a_client_ahead_of_the_edge_waits_at_a_gate_and_gets_no_duplicate() -> None:
    a, ahead = Recorder(), Recorder()
    hub = await hub_with(History(), a)
    hub.attach(ahead, "EURUSD", Position("e1", 3), tick(3))  # type: ignore[arg-type]
    for seq in (2, 3, 4):
        hub.on_tick("EURUSD", tick(seq))
    assert a.seen == [2, 3, 4]
    assert ahead.seen == [4]


async def test_reference_counts_and_bus_subscription_come_back_to_what_is_needed() -> None:
    class Bus:
        def __init__(self) -> None:
            self.symbols: set[str] = set()

        async def subscribe(self, symbols: list[str]) -> None:
            await asyncio.sleep(0.01)
            self.symbols.update(symbols)

        async def unsubscribe(self, symbols: list[str]) -> None:
            await asyncio.sleep(0.01)
            self.symbols.difference_update(symbols)

    hub, bus = Hub(History()), Bus()
    hub.subscriber = bus  # type: ignore[assignment]
    runner = asyncio.create_task(hub.run())
    hub.acquire(["EURUSD", "GBPUSD"])
    hub.release(["GBPUSD"])
    hub.acquire(["USDJPY"])
    await hub.synced()
    assert bus.symbols == {"EURUSD", "USDJPY"}
    hub.release(["EURUSD", "USDJPY"])
    await hub.synced()
    assert bus.symbols == set() and hub.symbols() == set()
    runner.cancel()


async def test_a_failed_bus_unsubscribe_does_not_skip_the_subscribe_of_the_same_change() -> None:
    class Bus:
        def __init__(self) -> None:
            self.symbols: set[str] = set()

        async def subscribe(self, symbols: list[str]) -> None:
            self.symbols.update(symbols)

        async def unsubscribe(self, symbols: list[str]) -> None:
            raise KeyError(("127.0.0.1", 7000))  # a node dropped between two slot groups

    hub, bus = Hub(History()), Bus()
    hub.subscriber = bus  # type: ignore[assignment]
    hub.acquire(["EURUSD"])
    runner = asyncio.create_task(hub.run())
    await hub.synced()
    hub.release(["EURUSD"])
    hub.acquire(["GBPUSD"])  # one change: drop EURUSD (fails), add GBPUSD
    await hub.synced()
    runner.cancel()
    assert "GBPUSD" in bus.symbols, bus.symbols


async def test_a_max_rate_bucket_sends_the_latest_tick_at_most_that_often_framed_once() -> None:
    fast, slow_a, slow_b = Recorder(), Recorder(), Recorder()
    hub = await hub_with(History(), fast)
    for w in (slow_a, slow_b):
        hub.attach(w, "EURUSD", Position("e1", 1), tick(1), rate=10.0)  # type: ignore[arg-type]
    for seq in range(2, 8):  # six ticks at once
        hub.on_tick("EURUSD", tick(seq))
    assert fast.seen == [2, 3, 4, 5, 6, 7]
    assert slow_a.seen == [2]  # the first goes at once, the rest wait for the next slot
    await asyncio.sleep(0.15)
    assert slow_a.seen == [2, 7] and slow_a.frames[1] is slow_b.frames[1]
    assert orjson.loads(slow_a.frames[1][2:])["conflated"] is True  # 3-6 were skipped, not lost
    hub.on_tick("EURUSD", tick(8))  # within the slot: waits, replaces nothing
    await asyncio.sleep(0.15)
    assert slow_a.seen == [2, 7, 8] and "conflated" not in orjson.loads(slow_a.frames[2][2:])


async def test_leaving_a_max_rate_bucket_cancels_its_timer() -> None:
    slow = Recorder()
    hub = await hub_with(History())
    hub.attach(slow, "EURUSD", Position("e1", 1), tick(1), rate=1.0)  # type: ignore[arg-type]
    hub.on_tick("EURUSD", tick(2))
    hub.on_tick("EURUSD", tick(3))  # pending, timer armed
    hub.detach(slow, ["EURUSD"])  # type: ignore[list-item]
    hub.release(["EURUSD"])
    await asyncio.sleep(0)
    assert slow.seen == [2]


async def test_pending_clients_get_a_new_symbols_first_tick_live_with_no_reset_nor_repair() -> None:
    history = History()
    hub = Hub(history, repair_timeout=0.2)
    changes: list[set[str]] = []
    hub.on_symbols = lambda: changes.append(hub.symbols())
    a, b = Recorder(), Recorder()
    hub.acquire(["XAUUSD"])
    hub.attach_pending(a, "XAUUSD")  # type: ignore[arg-type]
    hub.attach_pending(b, "XAUUSD", tradermade=True)  # type: ignore[arg-type]
    assert hub.last("XAUUSD") is None
    for seq in (57, 58, 59):  # wherever the leader's numbering stands
        hub.on_tick("XAUUSD", tick(seq, symbol="XAUUSD"))
    await asyncio.sleep(0)
    assert a.seen == [57, 58, 59] and len(b.frames) == 3
    assert history.calls == []  # the first tick is where the stream starts: nothing to repair
    assert changes == [{"XAUUSD"}]


async def test_a_pending_client_gets_the_first_tick_a_later_subscriber_read_as_its_snapshot() -> None:
    # B reads the symbol's first tick from fx:last before its pub/sub copy reaches the edge: that
    # copy is then a duplicate, so A (waiting for the first tick) must get it from B's attach.
    hub = Hub(History(), repair_timeout=0.2)
    a, b = Recorder(), Recorder()
    hub.acquire(["XAUUSD"])
    hub.attach_pending(a, "XAUUSD")  # type: ignore[arg-type]
    hub.acquire(["XAUUSD"])
    first = tick(1, symbol="XAUUSD")
    hub.attach(b, "XAUUSD", position_of(first), first)  # type: ignore[arg-type]
    hub.on_tick("XAUUSD", first)  # the pub/sub copy: seen already
    hub.on_tick("XAUUSD", tick(2, symbol="XAUUSD"))
    await asyncio.sleep(0)
    assert a.seen == [1, 2] and b.seen == [2]
