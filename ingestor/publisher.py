"""Batches encoded ticks and publishes each batch in one pipelined round trip."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, deque

from redis.exceptions import RedisError

from ingestor import metrics
from ingestor.backoff import Backoff
from shared.bus import Bus, Message, PartlyPublished
from shared.tick import Tick, encode_tick

log = logging.getLogger("fxproxy.ingestor.publisher")

PARTIAL_RETRY = 0.05  # seconds before retrying what a shard that is away did not take
WARN_INTERVAL = 1.0  # at most one "partly failed" warning this often while a shard is away
# Longest wait between retries of a batch that holds only an away shard's ticks, when no fresh
# ones come: a quiet market's parked ticks go out this soon after the shard is back.
PARKED_RETRY_MAX = 0.5


class Publisher:
    """Ticks queue while a round trip is in flight, so batches grow with load by themselves."""

    def __init__(self, bus: Bus, max_queue: int = 100_000, max_batch: int = 2000,
                 fence: str = "") -> None:
        self._bus = bus
        self.fence = fence  # this term's leader token ("" = none); Fenced once another leads
        self._queue: deque[Message] = deque()
        self._parked = _Parked()  # what a shard that is away did not take yet
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def put(self, tick: Tick) -> None:
        if len(self._queue) >= self._max_queue:
            # Redis has been away long enough to fill the queue: old prices are worth least.
            self._queue.popleft()
            metrics.DROPPED.inc()
        self._queue.append(Message(tick.symbol, tick.seq, encode_tick(tick)))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        warned_at = float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or self._parked:
                retried, fresh = self._next_batch()
                batch = [*retried, *fresh]
                metrics.QUEUE.set(len(self._queue) + len(self._parked))
                try:
                    await self._bus.publish(batch, self.fence)
                except asyncio.CancelledError:
                    # The term ended mid-call: keep the batch for the next one (it may have run
                    # in Redis already; a replay is harmless, a lost batch is a hole in history).
                    self._queue.extendleft(reversed(fresh))
                    raise
                except PartlyPublished as exc:
                    # One shard is away, the others took their ticks. Its ticks are parked and
                    # retried beside each batch of fresh ones, so the live shards keep flowing
                    # rather than waiting behind a queue front that only the away shard holds.
                    self._park(exc.unpublished, len(retried))
                    metrics.PUBLISH_ERRORS.inc()
                    metrics.TICKS_PUBLISHED.inc(len(batch) - len(exc.unpublished))
                    now = time.monotonic()
                    if now - warned_at >= WARN_INTERVAL:  # a shard away for 15 s is not 300 lines
                        warned_at = now
                        log.warning("publish partly failed", extra={
                            "error": str(exc), "parked": len(self._parked),
                            "retry_s": PARTIAL_RETRY})
                    if not self._queue:  # else the next batch of fresh ticks retries them
                        await self._wait_for_ticks(PARTIAL_RETRY)
                    continue
                except (RedisError, OSError) as exc:
                    # Keep the batch: edges drop duplicate seqs, so a retry never shows twice.
                    self._queue.extendleft(reversed(fresh))
                    metrics.PUBLISH_ERRORS.inc()
                    delay = backoff.next_delay()
                    if not self._parked or any(not self._parked.count(m.symbol) for m in fresh):
                        log.warning("publish failed", extra={"error": str(exc),
                                                             "retry_s": round(delay, 2)})
                        await asyncio.sleep(delay)
                        continue
                    # The batch held only the symbols of a shard known to be away: that says
                    # nothing of the live shards, so the next fresh ticks end the wait (soon,
                    # not at once: at most one retry a PARTIAL_RETRY while nothing else works).
                    now = time.monotonic()
                    if now - warned_at >= WARN_INTERVAL:
                        warned_at = now
                        log.warning("publish failed: a shard is still away", extra={
                            "error": str(exc), "parked": len(self._parked)})
                    await asyncio.sleep(PARTIAL_RETRY)
                    if len(self._queue) <= len(fresh):
                        await self._wait_for_ticks(min(delay, PARKED_RETRY_MAX))
                    continue
                backoff.reset()
                self._parked.drop(len(retried))
                self._bound_parked()
                metrics.TICKS_PUBLISHED.inc(len(batch))
            metrics.QUEUE.set(0)
            self._idle.set()

    async def _wait_for_ticks(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    def _next_batch(self) -> tuple[list[Message], list[Message]]:
        """At most max_batch ticks: the oldest parked ones (the front of `_parked`, left there
        until published) and fresh ones from the queue.

        A long outage parks far more than one call should carry (a script call that outlasts
        its timeout runs anyway, looks failed and is parked again): so parked ticks go out in
        chunks, and while fresh ticks wait they keep at least half of each batch, or the live
        shards would wait out the backlog. A fresh tick of a symbol still parked behind the
        chunk joins the back of `_parked` instead: it must not overtake them.
        """
        parked = len(self._parked)
        n_fresh = min(len(self._queue), self._max_batch - min(parked, self._max_batch // 2))
        retried = self._parked.front(min(parked, self._max_batch - n_fresh))
        in_chunk = Counter(m.symbol for m in retried)
        fresh: list[Message] = []
        for _ in range(n_fresh):
            message = self._queue.popleft()
            if self._parked.count(message.symbol) > in_chunk[message.symbol]:
                self._parked.append(message)
            else:
                fresh.append(message)
        return retried, fresh

    def _park(self, unpublished: list[Message], retried: int) -> None:
        """Replace the `retried` front of the parked ticks by what a shard that is away did not
        take (in the batch's order: a symbol's older ticks first), bounded like the queue."""
        self._parked.drop(retried)
        self._parked.push_front(unpublished)
        self._bound_parked()

    def _bound_parked(self) -> None:
        over = len(self._parked) - self._max_queue
        if over > 0:
            self._parked.drop(over)  # old prices are worth least, as in put()
            metrics.DROPPED.inc(over)

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is published; False if that took too long."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


class _Parked:
    """Ticks waiting for a shard, oldest first, with a count per symbol (asked once per fresh
    tick while a shard is away: a scan of up to max_queue ticks each time would cost more)."""

    def __init__(self) -> None:
        self._ticks: deque[Message] = deque()
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._ticks)

    def count(self, symbol: str) -> int:
        return self._counts[symbol]

    def front(self, n: int) -> list[Message]:
        return list(itertools.islice(self._ticks, n))

    def append(self, message: Message) -> None:
        self._ticks.append(message)
        self._counts[message.symbol] += 1

    def push_front(self, messages: list[Message]) -> None:
        self._ticks.extendleft(reversed(messages))
        self._counts.update(m.symbol for m in messages)

    def drop(self, n: int) -> None:
        for _ in range(n):
            symbol = self._ticks.popleft().symbol
            self._counts[symbol] -= 1
            if not self._counts[symbol]:
                del self._counts[symbol]
