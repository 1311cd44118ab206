"""Wires the ingestor: leader election, then sequencer, publisher and upstream while leading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.leader import Leadership, SoleLeader
from ingestor.publisher import Publisher
from ingestor.sequencer import Sequencer
from ingestor.upstream import Upstream
from shared.bus import Bus, Fenced
from shared.metrics import serve_health
from shared.settings import IngestorSettings

log = logging.getLogger("fxproxy.ingestor")
T = TypeVar("T")


class LostLeadership(Exception):
    pass


async def _retrying(what: str, call: Callable[[], Awaitable[T]], backoff: Backoff) -> T:
    """Await `call()` until Redis answers; the ingestor outlives Redis restarts."""
    while True:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            delay = backoff.next_delay()
            log.warning(f"{what} failed", extra={"error": str(exc), "retry_s": round(delay, 2)})
            await asyncio.sleep(delay)


async def _campaign(leadership: Leadership, settings: IngestorSettings, stop: asyncio.Event) -> str | None:
    """Wait as a standby until this node leads (its token) or it is told to stop (None)."""
    announced = False
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    while not stop.is_set():
        token = await _retrying("leader election", leadership.acquire, backoff)
        if token is not None:
            return token
        if not announced:
            log.info("standing by: another ingestor leads")
            announced = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.leader_ttl / 3)
    return None


async def _hold(leadership: Leadership, publisher: Publisher, ttl: float) -> None:
    """Renew the lease every ttl/3; raise LostLeadership once it is someone else's or stale."""
    loop = asyncio.get_running_loop()
    renewed = loop.time()
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            token = await leadership.renew(publisher.fence)
        except (RedisError, OSError) as exc:
            if loop.time() - renewed > ttl:  # our lease has run out: assume another leads
                raise LostLeadership(f"could not renew the lease for {ttl:g}s: {exc}") from exc
            continue
        if token is None:
            raise LostLeadership("another ingestor holds the lease")
        if token != publisher.fence:
            log.info("lease taken again under a new epoch", extra={"token": token})
            publisher.fence = token
        renewed = loop.time()


async def _lead(settings: IngestorSettings, bus: Bus, leadership: Leadership, token: str,
                sequencer: Sequencer, upstream_up: asyncio.Event, stop: asyncio.Event) -> bool:
    """Stream while we lead. True when told to stop, False when leadership was lost."""
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    sequencer.merge(await _retrying("loading last ticks", bus.last, backoff))
    publisher = Publisher(bus, fence=token)
    upstream = Upstream(
        settings.upstream_urls,
        settings.upstream_key.get_secret_value(),
        settings.symbols,
        lambda quote: publisher.put(sequencer.number(quote)),
        headers=settings.upstream_headers,
        silence_timeout=settings.silence_timeout,
        backoff=Backoff(settings.backoff_initial, settings.backoff_max),
        connected=upstream_up,
    )
    metrics.LEADER.set(1)
    log.info("leading", extra={"token": token, "symbols": len(settings.symbols)})
    streaming = asyncio.create_task(upstream.run())
    tasks = [asyncio.create_task(publisher.run()),
             asyncio.create_task(_hold(leadership, publisher, settings.leader_ttl))]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([streaming, *tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            streaming.cancel()
            if not await publisher.flush(2.0):
                log.warning("ticks left unpublished at shutdown")
            return True
        for task in done:
            try:
                task.result()
            except (LostLeadership, Fenced) as exc:
                # Leave the vendor at once: it allows one connection, and the new leader needs it.
                log.warning("lost leadership, standing down", extra={"reason": str(exc)})
                return False
        raise RuntimeError("an ingestor task ended by itself")  # pragma: no cover
    finally:
        metrics.LEADER.set(0)
        for task in (streaming, *tasks, stopper):
            task.cancel()
        for task in (streaming, *tasks, stopper):
            with contextlib.suppress(asyncio.CancelledError, LostLeadership, Fenced):
                await task
        if stop.is_set():
            with contextlib.suppress(RedisError, OSError):
                await leadership.release(publisher.fence)


async def run_ingestor(settings: IngestorSettings, bus: Bus, stop: asyncio.Event,
                       leadership: Leadership | None = None) -> None:
    if not settings.upstream_urls:
        raise ValueError("FXPROXY_UPSTREAM_URLS is empty: name at least one upstream WebSocket URL")
    if not settings.symbols:
        raise ValueError("FXPROXY_SYMBOLS is empty: name the symbols to stream")
    leadership = leadership or SoleLeader()
    upstream_up = asyncio.Event()
    sequencer = Sequencer()  # outlives terms: a Redis that lost its data must not restart seq
    health = None
    if settings.metrics_port:
        health = await serve_health(settings.metrics_host, settings.metrics_port, upstream_up.is_set)
    log.info("ingestor started", extra={"symbols": len(settings.symbols),
                                        "upstreams": len(settings.upstream_urls)})
    try:
        while True:
            token = await _campaign(leadership, settings, stop)
            if token is None or await _lead(settings, bus, leadership, token, sequencer, upstream_up, stop):
                break
    finally:
        if health is not None:
            health.close()
        log.info("ingestor stopped")
