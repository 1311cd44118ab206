"""Wires the ingestor: bus, sequencer, publisher, upstream supervision, health endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from ingestor.backoff import Backoff
from ingestor.publisher import Publisher
from ingestor.sequencer import Sequencer
from ingestor.upstream import Upstream
from shared.bus import Bus
from shared.metrics import serve_health
from shared.settings import IngestorSettings

log = logging.getLogger("fxproxy.ingestor")


async def _load_sequencer(bus: Bus, backoff: Backoff) -> Sequencer:
    while True:
        try:
            return Sequencer.from_last(await bus.last())
        except (RedisError, OSError) as exc:
            delay = backoff.next_delay()
            log.warning("bus unreachable at start", extra={"error": str(exc), "retry_s": round(delay, 2)})
            await asyncio.sleep(delay)


async def run_ingestor(settings: IngestorSettings, bus: Bus, stop: asyncio.Event) -> None:
    if not settings.upstream_urls:
        raise ValueError("FXPROXY_UPSTREAM_URLS is empty: name at least one upstream WebSocket URL")
    if not settings.symbols:
        raise ValueError("FXPROXY_SYMBOLS is empty: name the symbols to stream")
    sequencer = await _load_sequencer(bus, Backoff(settings.backoff_initial, settings.backoff_max))
    publisher = Publisher(bus)
    upstream = Upstream(
        settings.upstream_urls,
        settings.upstream_key.get_secret_value(),
        settings.symbols,
        lambda quote: publisher.put(sequencer.number(quote)),
        headers=settings.upstream_headers,
        silence_timeout=settings.silence_timeout,
        backoff=Backoff(settings.backoff_initial, settings.backoff_max),
    )
    health = None
    if settings.metrics_port:
        health = await serve_health(
            settings.metrics_host, settings.metrics_port, upstream.connected.is_set
        )
    log.info("ingestor started", extra={"symbols": len(settings.symbols),
                                        "upstreams": len(settings.upstream_urls)})
    tasks = [asyncio.create_task(publisher.run()), asyncio.create_task(upstream.run())]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper:
                task.result()  # a crashed task is a crashed ingestor: let it raise
    finally:
        tasks[1].cancel()
        if not await publisher.flush(2.0):
            log.warning("ticks left unpublished at shutdown")
        for task in (*tasks, stopper):
            task.cancel()
        for task in (*tasks, stopper):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if health is not None:
            health.close()
        log.info("ingestor stopped")
