"""A Jepsen-style witness: a WebSocket client that reconnects, resumes, and accounts for every tick.

A `Witness` connects to an edge (or nginx) with the API key, subscribes to its symbols and, when
the connection drops, reconnects (bounded attempts, short backoff, moving through its URLs) and
resumes every symbol with `since` = the (epoch, seq) of the last tick it saw.

It records every event with a monotonic timestamp and judges each tick against the previous
one of its symbol:

- next: same epoch, seq + 1;
- announced: any other jump, after a `reset` for the symbol or a `recovered: false` for it;
- duplicate: same epoch and seq <= the last one (a snapshot at the last position included), or
  an epoch the symbol already left;
- silent gap: any other jump. A correct system never produces one.

The bookkeeping (`feed`, `note_*`) is pure and takes the time as an argument, so it is unit
tested with synthetic events; `run()` is the I/O shell around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

__all__ = ["Event", "Finding", "Witness"]

Position = tuple[str, int]

# Outcomes of a tick.
FIRST, NEXT, ANNOUNCED, DUPLICATE, SILENT_GAP = "first", "next", "announced", "duplicate", "silent_gap"


@dataclass(slots=True, frozen=True)
class Event:
    t: float  # time.monotonic() when it happened / arrived
    kind: str  # tick, reset, subscribed, error, connected, closed, connect_failed, other
    symbol: str | None = None
    position: Position | None = None
    outcome: str | None = None  # for ticks: first, next, announced, duplicate, silent_gap
    detail: Any = None


@dataclass(slots=True, frozen=True)
class Finding:
    """A silent gap or a duplicate, with what the witness had seen before it."""

    t: float
    symbol: str
    before: Position | None
    after: Position
    snapshot: bool

    def __str__(self) -> str:
        snap = " (snapshot)" if self.snapshot else ""
        return f"{self.symbol}: {self.before} then {self.after}{snap} at t={self.t:.3f}"


@dataclass(slots=True)
class _Track:
    last: Position | None = None
    announced: str | None = None  # why the next discontinuity is expected, until a new tick arrives
    left: set[str] = field(default_factory=set)  # epochs this symbol moved on from
    last_t: float | None = None


class Witness:
    def __init__(self, urls: str | Sequence[str], key: str, symbols: Sequence[str], *,
                 name: str = "witness", max_attempts: int = 40, max_connects: int = 50,
                 backoff_initial: float = 0.05, backoff_max: float = 0.5,
                 open_timeout: float = 2.0, resubscribe_delay: float = 0.3,
                 max_resubscribes: int = 100) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.key = key
        self.symbols = list(symbols)
        self.name = name
        self.max_attempts = max_attempts  # failed connects in a row before giving up
        self.max_connects = max_connects  # successful connects over the witness's life
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.resubscribe_delay = resubscribe_delay
        self.max_resubscribes = max_resubscribes
        # Vendor timestamps (`ts`, wall clock ms) are compared with monotonic moments through this.
        self.wall_offset = time.time() - time.monotonic()

        self.events: list[Event] = []
        self.silent_gaps: list[Finding] = []
        self.duplicates: list[Finding] = []
        self.announced = 0  # discontinuities that were announced (reset / recovered:false)
        self.resets = 0  # reset frames received
        self.recoveries: list[tuple[float, str, bool]] = []  # (t, symbol, recovered)
        self.anomalies: list[str] = []  # anything a correct edge would not send
        self.connects = 0
        self.closes: list[tuple[float, int | None, str]] = []  # (t, code, url)
        self.gave_up: str | None = None
        self.url: str | None = None  # where it is connected now
        self._tracks: dict[str, _Track] = {s: _Track() for s in self.symbols}
        self._tick_times: list[float] = []  # arrival of every tick that was not a duplicate
        self._fresh: list[tuple[float, int]] = []  # (arrival, vendor ts ms) of the same ticks
        self._ids = itertools.count(1)
        self._pending_since: dict[str, Position] = {}
        self._retry_subscribe = False
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # Results

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    def last(self, symbol: str) -> Position | None:
        return self._tracks[symbol].last if symbol in self._tracks else None

    def ticks(self, since: float = float("-inf")) -> int:
        """Ticks (not duplicates) that arrived after `since`."""
        return sum(1 for t in self._tick_times if t > since)

    def longest_pause(self, start: float = float("-inf"), end: float = float("inf")) -> float:
        """Longest time without a tick (any symbol), among ticks that arrived in [start, end]."""
        times = [t for t in self._tick_times if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def time_to_flow(self, after: float, *, fresh: bool = False) -> float | None:
        """Seconds from `after` (monotonic) until the next tick (not a duplicate) arrived.

        With `fresh`, only a tick the vendor made after that moment counts (its `ts`), so ticks
        already in flight when a fault struck do not hide the outage. None if none came.
        """
        if fresh:
            made_after_ms = int((after + self.wall_offset) * 1000)
            times = (t for t, ts in self._fresh if t > after and ts >= made_after_ms)
        else:
            times = (t for t in self._tick_times if t > after)
        first = next(times, None)
        return None if first is None else first - after

    def seen(self) -> dict[tuple[str, str, int], tuple[Any, Any, Any]]:
        """(symbol, epoch, seq) -> (ts, bid, ask) of every tick taken (not duplicates): to check
        that no position ever named two different prices (against Redis history, or another
        witness)."""
        return {(e.symbol, *e.position): (e.detail.get("ts"), e.detail.get("bid"), e.detail.get("ask"))
                for e in self.events
                if e.kind == "tick" and e.outcome != DUPLICATE and e.symbol and e.position}

    def stale_symbols(self, now: float, max_age: float) -> list[str]:
        """Symbols without a tick in the last `max_age` seconds (or never)."""
        return [s for s, tr in self._tracks.items() if tr.last_t is None or now - tr.last_t > max_age]

    def summary(self) -> str:
        return (f"{self.name}: ticks {len(self._tick_times)}, silent gaps {len(self.silent_gaps)}, "
                f"duplicates {len(self.duplicates)}, announced {self.announced}, resets {self.resets}, "
                f"reconnects {self.reconnects}, anomalies {len(self.anomalies)}")

    def findings(self, limit: int = 5) -> str:
        parts = [f"silent gap {f}" for f in self.silent_gaps[:limit]]
        parts += [f"duplicate {f}" for f in self.duplicates[:limit]]
        parts += self.anomalies[:limit]
        if self.gave_up:
            parts.append(f"gave up: {self.gave_up}")
        return f"{self.summary()}" + ("".join(f"\n    {p}" for p in parts))

    # Bookkeeping (pure: the time is passed in)

    def note_connected(self, t: float, url: str) -> None:
        self.connects += 1
        self.url = url
        self.events.append(Event(t, "connected", detail=url))

    def note_closed(self, t: float, code: int | None, reason: str = "") -> None:
        self.closes.append((t, code, self.url or ""))
        self.events.append(Event(t, "closed", detail=(code, reason, self.url)))
        self.url = None

    def note_connect_failed(self, t: float, url: str, error: str) -> None:
        self.events.append(Event(t, "connect_failed", detail=(url, error)))

    def subscribe_frame(self) -> dict[str, Any]:
        """The subscribe to send now: every symbol, resuming those it has seen from their last tick."""
        since = {s: tr.last for s, tr in self._tracks.items() if tr.last is not None}
        self._pending_since = dict(since)
        frame: dict[str, Any] = {"op": "subscribe", "symbols": self.symbols, "id": next(self._ids)}
        if since:
            frame["since"] = {s: {"epoch": e, "seq": n} for s, (e, n) in since.items()}
        return frame

    def feed(self, msg: dict[str, Any], t: float) -> None:
        """Account for one frame received at `t`."""
        kind = msg.get("type")
        if kind == "tick":
            self._on_tick(msg, t)
        elif kind == "reset":
            symbol = msg.get("symbol")
            self.resets += 1
            self.events.append(Event(t, "reset", symbol, detail=msg))
            if symbol in self._tracks:
                self._tracks[symbol].announced = f"reset to epoch {msg.get('epoch')}: {msg.get('reason')}"
            else:
                self.anomalies.append(f"reset for a symbol not subscribed: {msg}")
        elif kind == "subscribed":
            self.events.append(Event(t, "subscribed", detail=msg))
            recovered = msg.get("recovered") or {}
            for symbol in self._pending_since:
                if symbol not in recovered:
                    self.anomalies.append(f"resumed {symbol} with since but no recovered flag: {msg}")
            for symbol, ok in recovered.items():
                self.recoveries.append((t, symbol, bool(ok)))
                if not ok and symbol in self._tracks:
                    self._tracks[symbol].announced = "recovered:false"
            self._pending_since = {}
        elif kind == "error":
            self.events.append(Event(t, "error", detail=msg))
            if msg.get("code") == "unavailable":
                self._retry_subscribe = True  # Redis unreachable for that subscribe: send it again
            else:
                self.anomalies.append(f"error frame: {msg}")
        else:
            self.events.append(Event(t, "other", detail=msg))
            if kind not in ("pong", "authenticated", "unsubscribed"):
                self.anomalies.append(f"unexpected frame: {msg}")

    def _on_tick(self, msg: dict[str, Any], t: float) -> None:
        symbol, epoch, seq = msg.get("symbol"), msg.get("epoch"), msg.get("seq")
        if not isinstance(symbol, str) or not isinstance(epoch, str) or not isinstance(seq, int):
            self.anomalies.append(f"tick without a position: {msg}")
            return
        track = self._tracks.get(symbol)
        if track is None:
            self.anomalies.append(f"tick for a symbol not subscribed: {msg}")
            return
        pos, last, snapshot = (epoch, seq), track.last, bool(msg.get("snapshot"))
        if last is None:
            outcome = FIRST
        elif epoch == last[0] and seq <= last[1]:
            outcome = DUPLICATE
        elif epoch in track.left:
            outcome = DUPLICATE  # an epoch this symbol had already moved on from
        elif epoch == last[0] and seq == last[1] + 1:
            outcome = NEXT
        elif track.announced is not None:
            outcome = ANNOUNCED
        else:
            outcome = SILENT_GAP
        self.events.append(Event(t, "tick", symbol, pos, outcome, detail=msg))
        if outcome == DUPLICATE:
            self.duplicates.append(Finding(t, symbol, last, pos, snapshot))
            return
        if outcome == SILENT_GAP:
            self.silent_gaps.append(Finding(t, symbol, last, pos, snapshot))
        elif outcome == ANNOUNCED:
            self.announced += 1
        if last is not None and last[0] != epoch:
            track.left.add(last[0])
        track.last, track.announced, track.last_t = pos, None, t
        self._tick_times.append(t)
        ts = msg.get("ts")
        if isinstance(ts, int) and not snapshot:
            self._fresh.append((t, ts))

    # I/O

    async def __aenter__(self) -> Witness:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._task, timeout)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        """Connect, subscribe, read; on any disconnect reconnect and resume. Bounded throughout."""
        failures = 0
        index = 0
        delay = self.backoff_initial
        while not self._stopping:
            if self.connects >= self.max_connects:
                self.gave_up = f"connected {self.connects} times"
                return
            url = self.urls[index % len(self.urls)]
            try:
                ws = await connect(url, additional_headers={"Authorization": f"Bearer {self.key}"},
                                   open_timeout=self.open_timeout, close_timeout=1,
                                   ping_interval=None, max_queue=None)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.note_connect_failed(time.monotonic(), url, f"{type(exc).__name__}: {exc}")
                failures += 1
                if failures >= self.max_attempts:
                    self.gave_up = f"{failures} failed connects in a row, last: {exc!r}"
                    return
                index += 1  # try the next URL: this one may be dead or draining
                await asyncio.sleep(delay)
                delay = min(self.backoff_max, delay * 2)
                continue
            failures, delay = 0, self.backoff_initial
            self.note_connected(time.monotonic(), url)
            try:
                await self._session(ws)
            except ConnectionClosed:
                pass
            finally:
                await ws.close()
                if not self._stopping:
                    self.note_closed(time.monotonic(), ws.close_code, ws.close_reason or "")
                    index += 1  # resume elsewhere, as a client behind a balancer would

    async def _session(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._retry_subscribe = False
        resubscribes = 0
        await ws.send(orjson.dumps(self.subscribe_frame()).decode())
        async for raw in ws:
            self.feed(orjson.loads(raw), time.monotonic())
            if self._retry_subscribe:
                self._retry_subscribe = False
                resubscribes += 1
                if resubscribes > self.max_resubscribes:
                    self.anomalies.append(f"subscribe refused {resubscribes} times on {self.url}")
                    return
                await asyncio.sleep(self.resubscribe_delay)
                await ws.send(orjson.dumps(self.subscribe_frame()).decode())
