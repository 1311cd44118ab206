"""Who on this edge wants which symbol, and the one ordered, gap-checked stream of each symbol.

Reference counts change synchronously (no await, so a cancelled client can never leak one);
a single task brings the bus subscription in line with them. Every tick is checked against
its symbol's last position: duplicates are dropped, a gap is filled from history before later
ticks go out, and what cannot be filled, or a new epoch, is announced to clients with `reset`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edge import metrics
from edge.protocol import reset, text_frame
from edge.writer import Writer
from shared.bus import Subscriber
from shared.tick import Position, mark, position_of, to_tradermade

log = logging.getLogger("fxproxy.edge.hub")

History = Callable[[str, int, int], Awaitable[list[bytes]]]
MAX_HELD = 10_000  # live ticks of one symbol held during a repair before we stop waiting
RECENT = 64  # ticks per symbol kept to complete resumes (see Stream.recent)
REPAIR_RETRY = 0.05  # seconds before a failed history read is tried again (doubling to 0.5)


@dataclass(slots=True)
class Throttle:
    """Subscribers of one symbol at one max rate: at most `rate` ticks a second, each the latest
    (Lightstreamer's max frequency). Its frames are built once for all of them."""

    rate: float
    native: set[Writer] = field(default_factory=set)
    tradermade: set[Writer] = field(default_factory=set)
    due: float = 0.0  # loop time when the next tick may go
    pending: bytes | None = None  # the latest tick, waiting for `due`
    replaced: bool = False  # `pending` replaced older ticks: it goes out marked conflated
    timer: asyncio.TimerHandle | None = None

    def empty(self) -> bool:
        return not self.native and not self.tradermade

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@dataclass(slots=True)
class Stream:
    """One symbol as this edge has delivered it."""

    position: Position | None = None
    payload: bytes = b""
    held: list[bytes] | None = None  # not None while a repair runs: live ticks wait here
    native: set[Writer] = field(default_factory=set)
    tradermade: set[Writer] = field(default_factory=set)
    throttles: dict[float, Throttle] = field(default_factory=dict)
    gates: dict[Writer, tuple[Position, bool, float | None]] = field(default_factory=dict)
    # The last ticks delivered: a resume whose history read raced ahead of the stream is
    # completed from here, with no second read.
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=RECENT))

    def add(self, writer: Writer, tradermade: bool, rate: float | None) -> None:
        if rate is None:
            (self.tradermade if tradermade else self.native).add(writer)
            return
        throttle = self.throttles.get(rate) or self.throttles.setdefault(rate, Throttle(rate))
        (throttle.tradermade if tradermade else throttle.native).add(writer)

    def remove(self, writer: Writer) -> None:
        self.native.discard(writer)
        self.tradermade.discard(writer)
        self.gates.pop(writer, None)
        for rate, throttle in list(self.throttles.items()):
            throttle.native.discard(writer)
            throttle.tradermade.discard(writer)
            if throttle.empty():
                throttle.cancel()
                del self.throttles[rate]


class Hub:
    def __init__(self, history: History, repair_timeout: float = 2.0, replay_limit: int = 1000) -> None:
        self.subscriber: Subscriber | None = None
        self._history = history
        self._repair_timeout = repair_timeout
        self._replay_limit = replay_limit
        self._refs: Counter[str] = Counter()
        self._streams: dict[str, Stream] = {}
        self._on_bus: set[str] = set()  # what the bus subscription holds (or is being told)
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._synced.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_symbols: Callable[[], None] | None = None  # told whenever symbols() may have changed

    # Reference counts and the bus subscription

    def symbols(self) -> set[str]:
        return set(self._refs)

    def acquire(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._refs[symbol] += 1
            self._streams.setdefault(symbol, Stream())
        self._mark_changed()

    def release(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._refs[symbol] -= 1
            if self._refs[symbol] <= 0:
                del self._refs[symbol]
                stream = self._streams.pop(symbol, None)
                for throttle in stream.throttles.values() if stream else ():
                    throttle.cancel()
        self._mark_changed()

    def _mark_changed(self) -> None:
        metrics.SUBSCRIBED_SYMBOLS.set(len(self._refs))
        if self.on_symbols is not None:
            self.on_symbols()
        if self._on_bus.symmetric_difference(self._refs):
            self._synced.clear()
            self._changed.set()

    async def synced(self) -> None:
        """Wait until the bus subscription covers every symbol acquired so far."""
        await self._synced.wait()

    async def run(self) -> None:
        """Keep the bus subscription equal to the symbols in use; the only task that changes it."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            add = [s for s in self._refs if s not in self._on_bus]
            drop = [s for s in self._on_bus if s not in self._refs]
            self._on_bus.update(add)
            self._on_bus.difference_update(drop)
            if self.subscriber is not None:
                # Apart: a failed unsubscribe must not skip the subscribe (_on_bus lists `add`).
                if drop:
                    try:
                        await self.subscriber.unsubscribe(drop)
                    except Exception as exc:  # the subscriber resubscribes its whole set on reconnect
                        log.warning("bus unsubscribe failed", extra={"error": repr(exc)})
                if add:
                    try:
                        await self.subscriber.subscribe(add)
                    except Exception as exc:
                        log.warning("bus subscribe failed", extra={"error": repr(exc)})
            if not self._changed.is_set():
                self._synced.set()

    # Attaching clients

    def last(self, symbol: str) -> tuple[Position, bytes] | None:
        stream = self._streams.get(symbol)
        if stream is None or stream.position is None:
            return None
        return stream.position, stream.payload

    def recent(self, symbol: str) -> list[bytes]:
        """The last ticks this edge delivered for a symbol, oldest first."""
        stream = self._streams.get(symbol)
        return list(stream.recent) if stream is not None else []

    def attach(self, writer: Writer, symbol: str, position: Position, payload: bytes,
               tradermade: bool = False, rate: float | None = None) -> None:
        """Add a client that has been sent everything up to `position`.

        If this edge has not delivered that far yet, the client waits at a gate until it has,
        so nothing it already got is sent again.
        """
        stream = self._streams[symbol]  # acquired before
        if stream.position is None:
            # The first client of a symbol: its snapshot is where this edge's stream starts, so a
            # tick published between the snapshot read and the subscription shows as a gap.
            # Clients already waiting for the symbol's first tick (pending) get this one now: its
            # pub/sub copy will be dropped as seen.
            self._take(symbol, stream, payload, repair=False)
        elif stream.position.epoch == position.epoch and stream.position.seq < position.seq:
            stream.gates[writer] = (position, tradermade, rate)
            return
        stream.add(writer, tradermade, rate)

    def attach_pending(self, writer: Writer, symbol: str, tradermade: bool = False,
                       rate: float | None = None) -> None:
        """Add a client of a symbol that has never ticked: the stream starts at its first tick,
        which this client gets like any live tick (no snapshot, no reset, no gap)."""
        self._streams[symbol].add(writer, tradermade, rate)  # acquired before

    def detach(self, writer: Writer, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            stream = self._streams.get(symbol)
            if stream is not None:
                stream.remove(writer)

    def set_rate(self, writer: Writer, symbol: str, tradermade: bool, rate: float | None) -> None:
        """Move an attached client to another max rate (its key's cap changed)."""
        stream = self._streams.get(symbol)
        if stream is not None and writer not in stream.gates:
            stream.remove(writer)
            stream.add(writer, tradermade, rate)

    # Ticks

    def on_tick(self, symbol: str, payload: bytes) -> None:
        """Called by the bus reader for every tick."""
        metrics.MESSAGES.inc()
        stream = self._streams.get(symbol)
        if stream is None:
            return  # unsubscribed meanwhile
        if stream.held is not None:
            stream.held.append(payload)
            if len(stream.held) > MAX_HELD:
                self._finish_repair(symbol, stream, [])
            return
        self._take(symbol, stream, payload, repair=True)

    def _take(self, symbol: str, stream: Stream, payload: bytes, repair: bool) -> bool:
        """Deliver one tick in order; True if it came after a hole that was announced."""
        try:
            pos = position_of(payload)
        except ValueError:
            return False
        hole = False
        last = stream.position
        if last is not None:
            if pos.epoch != last.epoch:
                metrics.EPOCH_CHANGES.inc()
                log.info("stream restarted under a new epoch", extra={"symbol": symbol, "epoch": pos.epoch})
                self._announce(stream, symbol, pos.epoch, "stream restarted: history lost")
            elif pos.seq <= last.seq:
                metrics.DUPLICATES.inc()
                return False
            elif pos.seq != last.seq + 1:
                metrics.GAPS.inc()
                if repair:
                    stream.held = [payload]
                    self._spawn(self._repair(symbol, stream, last))
                    return False
                hole = True
                metrics.GAPS_UNRECOVERABLE.inc()
                log.warning("gap not recoverable", extra={"symbol": symbol, "after": last.seq,
                                                          "next": pos.seq})
                self._announce(stream, symbol, pos.epoch, f"ticks {last.seq + 1}-{pos.seq - 1} lost")
        stream.position, stream.payload = pos, payload
        stream.recent.append(payload)
        if stream.gates:
            self._open_gates(stream, pos)
        self._deliver(symbol, stream, payload)
        return hole

    def _deliver(self, symbol: str, stream: Stream | Throttle, payload: bytes) -> None:
        """Frame once, hand the same bytes to every subscriber."""
        delivered = 0
        if stream.native:
            frame = text_frame(payload)
            for writer in stream.native:
                writer.send_tick(symbol, frame)
            delivered = len(stream.native)
        if stream.tradermade:
            frame = text_frame(to_tradermade(payload))
            for writer in stream.tradermade:
                writer.send_tick(symbol, frame)
            delivered += len(stream.tradermade)
        metrics.DELIVERIES.inc(delivered)
        if isinstance(stream, Stream) and stream.throttles:
            now = asyncio.get_running_loop().time()
            for throttle in stream.throttles.values():
                self._offer(symbol, throttle, payload, now)

    def _offer(self, symbol: str, throttle: Throttle, payload: bytes, now: float) -> None:
        if throttle.pending is None and now >= throttle.due:
            throttle.due = now + 1 / throttle.rate
            self._deliver(symbol, throttle, payload)
            return
        if throttle.pending is not None:
            throttle.replaced = True
            metrics.THROTTLED.inc()
        throttle.pending = payload
        if throttle.timer is None:
            throttle.timer = asyncio.get_running_loop().call_at(
                throttle.due, self._release_throttled, symbol, throttle)

    def _release_throttled(self, symbol: str, throttle: Throttle) -> None:
        throttle.timer = None
        payload, throttle.pending = throttle.pending, None
        if payload is None:
            return
        throttle.due = asyncio.get_running_loop().time() + 1 / throttle.rate
        if throttle.replaced:
            throttle.replaced = False
            payload = mark(payload, b"conflated")  # its skipped seqs are not a gap
        self._deliver(symbol, throttle, payload)

    def _open_gates(self, stream: Stream, pos: Position) -> None:
        for writer, (at, tradermade, rate) in list(stream.gates.items()):
            if at.epoch != pos.epoch or pos.seq > at.seq:
                del stream.gates[writer]
                stream.add(writer, tradermade, rate)

    def _announce(self, stream: Stream, symbol: str, epoch: str, reason: str) -> None:
        # Waiting clients stand in the old epoch too: let them in so they hear the reset.
        self._open_gates(stream, Position(epoch, 0))
        frame = text_frame(reset(symbol, epoch, reason))
        native = list(stream.native)
        for throttle in stream.throttles.values():
            throttle.pending, throttle.replaced = None, False  # older than the reset
            native += throttle.native
        for writer in native:
            writer.forget(symbol)
            writer.send(frame)

    # Repairs

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _repair(self, symbol: str, stream: Stream, after: Position) -> None:
        """Fill a gap after `after` from history, retrying a failed read until the repair
        timeout: just after a failover the first read may still go to the node that died, and a
        symbol that ticks no more would otherwise never be refilled."""
        found: list[bytes] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._repair_timeout
        pause = REPAIR_RETRY
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    # Read past the gap too: what lies after a hole in history still goes out.
                    found = await self._history(symbol, after.seq, self._replay_limit)
                break
            except Exception as exc:  # any failure ends in a reset, never in a silent gap
                if loop.time() + pause >= deadline:
                    log.warning("history read failed during repair",
                                extra={"symbol": symbol, "error": repr(exc)})
                    break
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.5)
        if self._streams.get(symbol) is stream:
            self._finish_repair(symbol, stream, found)

    def _finish_repair(self, symbol: str, stream: Stream, found: list[bytes]) -> None:
        """Deliver what history had, then the held live ticks; any hole left is announced.

        Ticks history holds after a hole still go out (after the reset), not just the live ones.
        """
        held, stream.held = stream.held or [], None
        before = stream.position
        holes = sum(self._take(symbol, stream, payload, repair=False) for payload in found)
        if found and not holes and stream.position != before:
            metrics.GAPS_REPAIRED.inc()
            log.info("gap repaired from history", extra={"symbol": symbol, "ticks": len(found)})
        for payload in held:
            self._take(symbol, stream, payload, repair=False)

    def recover(self, symbols: Iterable[str] | None = None) -> None:
        """These symbols' bus subscriptions (all when None) were re-made: fetch from history
        whatever pub/sub dropped meanwhile."""
        for symbol in list(self._streams) if symbols is None else symbols:
            stream = self._streams.get(symbol)
            if stream is not None and stream.position is not None and stream.held is None:
                stream.held = []
                self._spawn(self._repair(symbol, stream, stream.position))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
