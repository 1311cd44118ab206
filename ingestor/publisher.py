"""Batches encoded ticks and publishes each batch in one pipelined round trip."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from redis.exceptions import RedisError

from ingestor import metrics
from ingestor.backoff import Backoff
from shared.bus import Bus, Message, PartlyPublished
from shared.tick import Tick, encode_tick

log = logging.getLogger("fxproxy.ingestor.publisher")

PARTIAL_RETRY = 0.05  # seconds before retrying what a shard that is away did not take
WARN_INTERVAL = 1.0  # at most one "partly failed" warning this often while a shard is away


class Publisher:
    """Ticks queue while a round trip is in flight, so batches grow with load by themselves."""

    def __init__(self, bus: Bus, max_queue: int = 100_000, max_batch: int = 2000,
                 fence: str = "") -> None:
        self._bus = bus
        self.fence = fence  # this term's leader token ("" = none); Fenced once another leads
        self._queue: deque[Message] = deque()
        self._parked: deque[Message] = deque()  # what a shard that is away did not take yet
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
                n = min(len(self._queue), self._max_batch)
                fresh = [self._queue.popleft() for _ in range(n)]
                # A symbol's parked ticks go first: its fresh ones must not overtake them.
                batch = [*self._parked, *fresh]
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
                    self._park(exc.unpublished)
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
                    away = {m.symbol for m in self._parked}
                    if not away or any(m.symbol not in away for m in fresh):
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
                        await self._wait_for_ticks(delay)
                    continue
                backoff.reset()
                self._parked.clear()
                metrics.TICKS_PUBLISHED.inc(len(batch))
            metrics.QUEUE.set(0)
            self._idle.set()

    async def _wait_for_ticks(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    def _park(self, unpublished: list[Message]) -> None:
        """The ticks a shard that is away did not take, in order, bounded like the queue."""
        self._parked = deque(unpublished)
        over = len(self._parked) - self._max_queue
        for _ in range(over):
            self._parked.popleft()  # old prices are worth least, as in put()
        if over > 0:
            metrics.DROPPED.inc(over)

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is published; False if that took too long."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
