"""Batches encoded ticks and publishes each batch in one pipelined round trip."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from redis.exceptions import RedisError

from ingestor import metrics
from ingestor.backoff import Backoff
from shared.bus import Bus, Message, PartlyPublished
from shared.tick import Tick, encode_tick

log = logging.getLogger("fxproxy.ingestor.publisher")

PARTIAL_RETRY = 0.05  # seconds before retrying what a shard that is away did not take


class Publisher:
    """Ticks queue while a round trip is in flight, so batches grow with load by themselves."""

    def __init__(self, bus: Bus, max_queue: int = 100_000, max_batch: int = 2000,
                 fence: str = "") -> None:
        self._bus = bus
        self.fence = fence  # this term's leader token ("" = none); Fenced once another leads
        self._queue: deque[Message] = deque()
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
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                n = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(n)]
                metrics.QUEUE.set(len(self._queue))
                try:
                    await self._bus.publish(batch, self.fence)
                except asyncio.CancelledError:
                    # The term ended mid-call: keep the batch for the next one (it may have run
                    # in Redis already; a replay is harmless, a lost batch is a hole in history).
                    self._queue.extendleft(reversed(batch))
                    raise
                except PartlyPublished as exc:
                    # One shard is away, the others took their ticks: retry only the rest, and
                    # soon, so the live shards' symbols keep flowing meanwhile.
                    self._queue.extendleft(reversed(exc.unpublished))
                    metrics.PUBLISH_ERRORS.inc()
                    metrics.TICKS_PUBLISHED.inc(n - len(exc.unpublished))
                    log.warning("publish partly failed", extra={"error": str(exc),
                                                                "retry_s": PARTIAL_RETRY})
                    await asyncio.sleep(PARTIAL_RETRY)
                    continue
                except (RedisError, OSError) as exc:
                    # Keep the batch: edges drop duplicate seqs, so a retry never shows twice.
                    self._queue.extendleft(reversed(batch))
                    metrics.PUBLISH_ERRORS.inc()
                    delay = backoff.next_delay()
                    log.warning("publish failed", extra={"error": str(exc), "retry_s": round(delay, 2)})
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                metrics.TICKS_PUBLISHED.inc(n)
            self._idle.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is published; False if that took too long."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
