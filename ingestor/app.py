"""Wires the ingestor: leader election, then sequencer, publisher and upstream while leading.

Every lease call has a deadline of ttl/3 (`_campaign`, `_hold`), so a hung Redis holds neither
for longer. A leader that cannot renew for a full TTL stands down and leaves the vendor, since
another process may lead by then. Leader dies → a standby leads within TTL + TTL/3 (its poll)
+ upstream login. After a Redis hang of any length, whoever's claim Redis ran first adopts it on
its next poll: ticks flow again about TTL/3 + login after Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from redis.exceptions import RedisError

from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.demand import DemandWatcher, take_over
from ingestor.leader import Leadership, SoleLeader
from ingestor.pool import UpstreamPool
from ingestor.publisher import Publisher
from ingestor.sequencer import Sequencer
from ingestor.verdicts import StatusBook, StatusReporter
from shared.bus import Bus, Fenced
from shared.bus_probe import BusProbe
from shared.demand import DemandStore, Handover, MemoryDemandStore
from shared.metrics import serve_health
from shared.settings import IngestorSettings
from shared.tasks import cancel_all, task_ended
from shared.tick import Position, Quote

log = logging.getLogger("fxproxy.ingestor")
T = TypeVar("T")

LEASE_ERRORS = (RedisError, OSError, TimeoutError)


class LostLeadership(Exception):
    pass


class _GivingWay(Exception):
    """This round, a node with positions in memory goes first."""


@dataclass
class _State:
    """What outlives a term: positions, unpublished ticks, and what /readyz reports."""

    bus: Bus
    fence: str
    sequencer: Sequencer = field(default_factory=Sequencer)
    publisher: Publisher | None = None
    term: int | None = None  # the term number of our last token
    upstream_up: asyncio.Event = field(default_factory=asyncio.Event)
    leading: bool = False
    saw_data: bool = False  # fx:last held ticks once: if it is empty now, Redis lost them


async def _retrying(what: str, call: Callable[[], Awaitable[T]], backoff: Backoff,
                    timeout: float | None = None) -> T:
    """Await `call()` until Redis answers; the ingestor outlives Redis restarts."""
    while True:
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                return await call()
        except LEASE_ERRORS as exc:
            delay = backoff.next_delay()
            log.warning(f"{what} failed", extra={"error": f"{type(exc).__name__}: {exc}",
                                                  "retry_s": round(delay, 2)})
            await asyncio.sleep(delay)


async def _campaign(leadership: Leadership, ttl: float, stop: asyncio.Event,
                    state: _State | None = None) -> tuple[str, float] | None:
    """Claim every ttl/3 until this node leads: (token, when the winning claim was sent), or None
    once told to stop. A claim that timed out may have run in Redis; the next one adopts it.

    A node that holds no positions of its own gives way for one TTL when Redis, which it has seen
    holding some, holds none any more (it lost its data): a node that still has them in memory
    then leads and continues every symbol, instead of this one starting new epochs.
    """
    loop = asyncio.get_running_loop()
    interval = ttl / 3
    announced = failing = False
    empty_since: float | None = None
    while not stop.is_set():
        sent = loop.time()
        try:
            if state is not None and not state.sequencer.positions():
                empty = not await asyncio.wait_for(state.bus.last(), interval)
                state.saw_data = state.saw_data or not empty
                empty_since = (empty_since or sent) if empty and state.saw_data else None
                if empty_since is not None and sent - empty_since < ttl:
                    raise _GivingWay()
            token = await asyncio.wait_for(leadership.claim(), interval)
        except _GivingWay:
            pass
        except LEASE_ERRORS as exc:
            if not failing:
                log.warning("leader election: Redis not answering",
                            extra={"error": f"{type(exc).__name__}: {exc}"})
                failing = True
        else:
            failing = False
            if token is not None:
                return token, sent
            if not announced:
                log.info("standing by: another ingestor leads")
                announced = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, sent + interval - loop.time()))
    return None


async def _hold(leadership: Leadership, ttl: float, renewed: float, token: str = "") -> NoReturn:
    """Renew every ttl/3; raise LostLeadership once another process holds the lease, or when no
    renewal got through for a full TTL since `renewed` (when the last good claim was sent).
    Our own lease taken again under a new term (it ran out in a hung Redis, or Redis lost it) is
    still ours: the publisher is fenced by process, not by term."""
    loop = asyncio.get_running_loop()
    interval = ttl / 3
    await asyncio.sleep(max(0.0, renewed + interval - loop.time()))
    while True:
        sent = loop.time()
        deadline = renewed + ttl
        try:
            async with asyncio.timeout(max(0.0, min(interval, deadline - sent))):
                held = await leadership.claim()
        except LEASE_ERRORS as exc:
            if loop.time() >= deadline:  # our lease has run out: another may lead by now
                raise LostLeadership(f"could not renew the lease for {ttl:g}s: "
                                     f"{type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(min(interval / 4, max(0.0, deadline - loop.time())))
            continue
        if held is None:
            raise LostLeadership("another ingestor holds the lease")
        if held != token:
            log.info("lease taken again under a new term", extra={"token": held})
            token = held
        renewed = sent
        await asyncio.sleep(max(0.0, sent + interval - loop.time()))


def term_of(token: str) -> int | None:
    """The term number in a lease token `{node}.{nonce}:{term}.{rand}` (None for "", no lease)."""
    try:
        return int(token.rpartition(":")[2].partition(".")[0])
    except ValueError:
        return None


async def _start_term(state: _State, settings: IngestorSettings, token: str) -> Publisher:
    """Continue the positions from fx:last. Ticks our last term numbered but could not publish
    (Redis hung or went away) go out first, unless another process may have numbered since: its
    term came between ours, or fx:last moved past our memory. Then they are superseded."""
    backoff = Backoff(settings.backoff_initial, min(settings.backoff_max, settings.leader_ttl / 3))
    last = await _retrying("loading last ticks", state.bus.last, backoff, settings.leader_ttl / 3)
    before = state.sequencer.positions()
    state.sequencer.merge(last)
    moved = any(state.sequencer.positions()[s] != p for s, p in before.items())
    term, previous = term_of(token), state.term
    # No term between ours, or Redis lost fx:epoch and nobody has published since.
    ours_since = term is None or (previous is not None and term == previous + 1) or not last
    state.term = term
    if state.publisher is None or moved or not ours_since:
        state.publisher = Publisher(state.bus, fence=state.fence)
    return state.publisher


async def _stream(settings: IngestorSettings, state: _State, publisher: Publisher,
                  demand: DemandStore) -> NoReturn:
    """Stream the static symbols and what demand asks for (ingestor/demand.py) through the session
    pool; its verdicts (streaming since a position, capacity, unknown) reach edges through the
    reporter (ingestor/verdicts.py)."""
    seed: Handover = []
    try:
        # What the previous leader streamed keeps its place (read before its verdicts go); its
        # verdicts themselves do not bind this term's sessions, and a stale one would refuse
        # every later subscriber at once: this term reports its own.
        async with asyncio.timeout(settings.leader_ttl / 3):
            seed = await take_over(demand)
            await demand.reset_statuses()
    except LEASE_ERRORS as exc:
        log.warning("taking over symbol statuses failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    reporter = StatusReporter(demand, state.bus)
    book = StatusBook(reporter.report)

    def on_quote(quote: Quote) -> None:
        tick = state.sequencer.number(quote)
        publisher.put(tick)
        book.quoted(tick.symbol, Position(tick.epoch, tick.seq))

    pool = UpstreamPool(settings, on_quote, book.pool_status, connected=state.upstream_up)

    def want(symbols: tuple[str, ...]) -> None:
        book.want(symbols)
        pool.want(symbols)

    want(tuple(settings.symbols))
    watcher = DemandWatcher(demand, settings.symbols, settings.on_demand, settings.demand_grace,
                            want, seed=seed)
    tasks = [asyncio.create_task(job) for job in (pool.run(), watcher.run(), reporter.run())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise RuntimeError("an upstream task ended by itself")  # pragma: no cover
    finally:
        metrics.UPSTREAM_SYMBOLS.set(0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _lead(settings: IngestorSettings, leadership: Leadership, token: str, claimed: float,
                state: _State, stop: asyncio.Event, demand: DemandStore) -> bool:
    """Stream while we lead. True when told to stop, False when leadership was lost."""
    holding = asyncio.create_task(_hold(leadership, settings.leader_ttl, claimed, token))
    stopper = asyncio.create_task(stop.wait())
    starting = asyncio.create_task(_start_term(state, settings, token))
    tasks: list[asyncio.Task[Any]] = [holding, stopper, starting]
    streaming: asyncio.Task[None] | None = None
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            publisher = starting.result()
            state.leading = True
            metrics.LEADER.set(1)
            log.info("leading", extra={"token": token, "symbols": len(settings.symbols)})
            streaming = asyncio.create_task(_stream(settings, state, publisher, demand))
            publishing = asyncio.create_task(publisher.run())
            tasks += [streaming, publishing]
            done, _ = await asyncio.wait([holding, stopper, streaming, publishing],
                                         return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            if streaming is not None:
                streaming.cancel()
                if state.publisher is not None and not await state.publisher.flush(2.0):
                    log.warning("ticks left unpublished at shutdown")
            return True
        for task in done:
            try:
                task.result()
            except (LostLeadership, Fenced) as exc:
                # Leave the vendor at once: it allows one connection, and the new leader needs it.
                log.warning("lost leadership, standing down", extra={"reason": str(exc)})
                if isinstance(exc, Fenced):
                    state.publisher = None  # its ticks are superseded by the other leader's
                return False
        raise RuntimeError("an ingestor task ended by itself")  # pragma: no cover
    finally:
        state.leading = False
        metrics.LEADER.set(0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, LostLeadership, Fenced):
                await task


async def run_ingestor(settings: IngestorSettings, bus: Bus, stop: asyncio.Event,
                       leadership: Leadership | None = None, demand: DemandStore | None = None) -> None:
    """Run until `stop` is set; releases the lease and closes `leadership` at the end.
    Without a demand store only the static symbols stream (no edge can ask for more)."""
    if not settings.upstream_urls:
        raise ValueError("FXPROXY_UPSTREAM_URLS is empty: name at least one upstream WebSocket URL")
    if not settings.symbols:
        raise ValueError("FXPROXY_SYMBOLS is empty: name the symbols to stream")
    leadership = leadership or SoleLeader()
    demand = demand or MemoryDemandStore()
    # Outlives terms: a Redis that lost its data must not restart seq, and ticks a term left
    # unpublished go out first when this process leads again.
    state = _State(bus, leadership.fence)
    probe = BusProbe(bus.ping, interval=0.5, timeout=1.5,
                     on_change=lambda ok: metrics.BUS_UP.set(1 if ok else 0))
    metrics.BUS_UP.set(1)
    probing = asyncio.create_task(probe.run(), name="bus probe")
    health = None
    if settings.metrics_port:
        health = await serve_health(
            settings.metrics_host, settings.metrics_port,
            lambda: state.leading and state.upstream_up.is_set() and probe.ok)
    log.info("ingestor started", extra={"symbols": len(settings.symbols),
                                        "upstreams": len(settings.upstream_urls)})

    async def elect_and_lead() -> None:
        while True:
            # With nobody to elect against (fence ""), there is nobody to give way to either.
            won = await _campaign(leadership, settings.leader_ttl, stop, state if state.fence else None)
            if won is None or await _lead(settings, leadership, *won, state, stop, demand):
                return

    leading = asyncio.create_task(elect_and_lead(), name="leadership")
    try:
        done, _ = await asyncio.wait({leading, probing}, return_when=asyncio.FIRST_COMPLETED)
        if leading not in done:
            stop.set()  # leave the vendor and the lease as on a stop; then cancel what remains
            raise task_ended(probing, log)
        if not leading.cancelled() and isinstance(leading.exception(), Exception):
            # A term's task failed (the upstream pool, the publisher): nothing here mends it.
            raise task_ended(leading, log)
        leading.result()
    finally:
        if not leading.done():
            await cancel_all([leading])
        # After leaving the vendor: a standby may take over at once. Also frees a lease that a
        # claim won while its reply was lost.
        with contextlib.suppress(*LEASE_ERRORS):
            await asyncio.wait_for(leadership.release(), settings.leader_ttl / 3)
        await cancel_all([probing])
        if health is not None:
            health.close()
        await leadership.close()
        log.info("ingestor stopped")
