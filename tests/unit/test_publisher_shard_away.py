"""The publisher while one cluster shard is away: the live shards' symbols keep flowing."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import pytest

from ingestor.publisher import WARN_INTERVAL, Publisher
from ingestor.sequencer import Sequencer
from shared.bus import Message, PartlyPublished
from shared.tick import Quote

AWAY = ("A0", "A1", "A2")  # the symbols of the shard that is away
LIVE = ("L0", "L1", "L2", "L3", "L4", "L5")


class _ShardAway:
    """Refuses the away shard's symbols until `back` is set, as ClusterBus does: all of a
    batch's symbols refused is the plain error, some of them is PartlyPublished."""

    def __init__(self) -> None:
        self.back = asyncio.Event()
        self.stored: list[tuple[float, Message]] = []
        self.batch_sizes: list[int] = []

    async def publish(self, messages: Sequence[Message], fence: str = "") -> None:
        await asyncio.sleep(0.002)  # a round trip
        self.batch_sizes.append(len(messages))
        now = asyncio.get_running_loop().time()
        if self.back.is_set():
            self.stored += ((now, m) for m in messages)
            return
        refused = [m for m in messages if m.symbol in AWAY]
        if refused and len(refused) == len(messages):
            raise ConnectionError("shard away")
        self.stored += ((now, m) for m in messages if m.symbol not in AWAY)
        if refused:
            raise PartlyPublished(refused, ConnectionError("shard away"))


@pytest.mark.parametrize(("burst", "interval"), [(9, 0.005), (1, 0.01)], ids=["busy", "quiet"])
async def test_live_shards_keep_publishing_while_one_shard_is_away(
        caplog: pytest.LogCaptureFixture, burst: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    bus = _ShardAway()
    # A small batch, so the away shard's backlog soon exceeds it, as 2000 does at 10k ticks/s.
    publisher = Publisher(bus, max_batch=50)  # type: ignore[arg-type]
    running = asyncio.create_task(publisher.run())
    seqs = Sequencer()
    put_at: dict[tuple[str, int], float] = {}
    outage = 1.5
    started = loop.time()
    symbols = itertools.cycle((*AWAY, *LIVE))
    while loop.time() - started < outage:
        # Busy: a batch always holds live symbols. Quiet: one tick at a time, so some batches
        # hold only the away shard's symbols (the bus's plain error, not PartlyPublished).
        for symbol in itertools.islice(symbols, burst):
            tick = seqs.number(Quote(symbol, 1.0, 1.1, 1.05, 1732186000000))
            put_at[symbol, tick.seq] = loop.time()
            publisher.put(tick)
        await asyncio.sleep(interval)
    bus.back.set()
    assert await publisher.flush(5)
    running.cancel()

    warnings = sum(r.getMessage() == "publish partly failed" for r in caplog.records)
    live_lag = max(at - put_at[m.symbol, m.seq] for at, m in bus.stored if m.symbol in LIVE)
    away_backlog = sum(1 for k in put_at if k[0] in AWAY)
    print(f"live lag while a shard was away: {live_lag * 1000:.0f} ms; away backlog "
          f"{away_backlog} ticks; largest batch {max(bus.batch_sizes)}; {len(bus.batch_sizes)} "
          f"batches, {warnings} warnings")
    # Before parking, the away shard's backlog filled every batch and the live symbols sat out
    # the publisher's backoff for the rest of the outage.
    assert live_lag < 0.5, live_lag
    assert away_backlog > (4 * 50 if burst > 1 else 20)  # busy: far more than a batch
    assert warnings <= outage / WARN_INTERVAL + 1 < len(bus.batch_sizes), warnings
    # Every tick stored exactly once, in order per symbol, the away shard's included.
    for symbol in (*AWAY, *LIVE):
        stored = [m.seq for _, m in bus.stored if m.symbol == symbol]
        assert stored == sorted(s for sym, s in put_at if sym == symbol), symbol


async def test_parked_ticks_are_bounded_like_the_queue() -> None:
    bus = _ShardAway()
    publisher = Publisher(bus, max_queue=100, max_batch=50)  # type: ignore[arg-type]
    running = asyncio.create_task(publisher.run())
    seqs = Sequencer()
    for _ in range(10):  # each batch is partly published, so the away shard's ticks park
        for symbol in ("A0",) * 40 + ("L0",):
            publisher.put(seqs.number(Quote(symbol, 1.0, 1.1, 1.05, 1732186000000)))
        await asyncio.sleep(0.1)
    back_at = asyncio.get_running_loop().time()
    bus.back.set()
    assert await publisher.flush(5)
    drained = asyncio.get_running_loop().time() - back_at
    running.cancel()
    away = [m.seq for _, m in bus.stored if m.symbol == "A0"]
    print(f"away ticks kept: {len(away)} of 400, all out {drained:.2f}s after the shard was back")
    # No fresh tick comes to wake the publisher: its own retries must (they used to back off
    # to 5 s).
    assert drained < 1.0, drained  # PARTIAL_RETRY + PARKED_RETRY_MAX, and a margin
    # The newest are kept (old prices are worth least), in order, at most the parked bound plus
    # what the queue held.
    assert away == sorted(away) and away[-1] == 400
    assert 40 <= len(away) <= 200, len(away)
    assert [m.seq for _, m in bus.stored if m.symbol == "L0"] == list(range(1, 11))


async def test_a_long_outages_parked_ticks_go_out_in_batches_of_max_batch() -> None:
    """10,000 ticks parked while a shard was away: once back, no call carries more than
    max_batch (one huge script call outlasts its timeout, looks failed, and is parked again),
    and the live symbols' fresh ticks keep their share of each batch while the backlog drains."""
    loop = asyncio.get_running_loop()
    bus = _ShardAway()
    publisher = Publisher(bus, max_batch=100)  # type: ignore[arg-type]
    running = asyncio.create_task(publisher.run())
    seqs = Sequencer()
    put_at: dict[tuple[str, int], float] = {}

    def put(symbol: str) -> None:
        tick = seqs.number(Quote(symbol, 1.0, 1.1, 1.05, 1732186000000))
        put_at[symbol, tick.seq] = loop.time()
        publisher.put(tick)

    for i in range(10_000):  # the outage: the away shard's ticks park, the live ones go out
        put(AWAY[i % len(AWAY)])
        put(LIVE[0])
        if i % 50 == 0:
            await asyncio.sleep(0.001)
    while publisher._queue:
        await asyncio.sleep(0.01)
        assert loop.time() - put_at[LIVE[0], 10_000] < 10, len(publisher._queue)
    parked = len(publisher._parked)
    bus.back.set()
    back_at = loop.time()
    started = len(bus.batch_sizes)
    while publisher._parked:  # live ticks keep coming while the backlog drains
        put(LIVE[1])
        await asyncio.sleep(0.002)
        assert loop.time() - back_at < 10, len(publisher._parked)
    assert await publisher.flush(5)
    running.cancel()
    drained = bus.batch_sizes[started:]
    live_lag = max(at - put_at[m.symbol, m.seq] for at, m in bus.stored
                   if m.symbol == LIVE[1])
    print(f"{parked} ticks parked; drained in {len(drained)} calls of at most {max(drained)} "
          f"ticks; live lag meanwhile {live_lag * 1000:.0f} ms")
    assert parked >= 9_000, parked
    assert max(bus.batch_sizes) <= 100, max(bus.batch_sizes)
    assert live_lag < 0.5, live_lag
    for symbol in (*AWAY, *LIVE[:2]):  # each tick once, in order
        stored = [m.seq for _, m in bus.stored if m.symbol == symbol]
        assert stored == sorted(s for sym, s in put_at if sym == symbol), symbol
