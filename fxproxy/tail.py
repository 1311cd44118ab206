"""`fxproxy tail`: follow symbols on one or more edges with the resuming client, and show them.

Three outputs: one line per tick (the default when stdout is not a terminal), one JSON object
a line for scripts (`--json`: ticks exactly as received, other events as {"event": ...}), and a
live table redrawn a few times a second (the default on a terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import orjson

from fxproxy.client import Anomaly, Client, Error, Event, Reset, State, Subscribed, Tick

REDRAW_INTERVAL = 0.25
RATE_WINDOW = 5.0  # ticks/s is measured over the last this many seconds


def format_tick(tick: Tick) -> str:
    flag = "  (snapshot)" if tick.snapshot else ""
    seq = f"  seq {tick.seq}" if tick.seq is not None else ""
    return f"{tick.symbol:<7} bid {tick.bid:<10} ask {tick.ask:<10} ts {tick.ts}{seq}{flag}"


def event_json(event: Event) -> bytes:
    """A tick as received; any other event as {"event": "<kind>", ...fields}."""
    if isinstance(event, Tick):
        return event.raw
    return orjson.dumps({"event": type(event).__name__.lower(), **dataclasses.asdict(event)})


def describe(event: Event) -> str | None:
    """A line for stderr, for the events worth telling a person about."""
    if isinstance(event, State):
        if event.state == "reconnecting":
            return f"reconnecting in {event.delay:.2f}s ({event.reason})"
        return f"closed: {event.reason}" if event.state == "closed" else None
    if isinstance(event, Reset):
        return f"{event.symbol}: reset ({event.reason})"
    if isinstance(event, Error):
        return f"error {event.code}: {event.message}"
    if isinstance(event, Anomaly):
        return f"{event.symbol}: unannounced {event.kind} {event.last} -> {event.got} (a bug: report it)"
    return None


@dataclass(slots=True)
class Row:
    first_mid: float
    tick: Tick
    arrivals: deque[float] = field(default_factory=deque)


class Table:
    """The live table's state and rendering (pure; `now` and `wall` are passed in)."""

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = list(symbols)
        self.rows: dict[str, Row] = {}
        self.started = 0.0
        self.status = "connecting"
        self.reconnects = self.resets = self.anomalies = 0
        self.note = ""

    def update(self, tick: Tick, now: float) -> None:
        row = self.rows.get(tick.symbol)
        if row is None:
            row = self.rows[tick.symbol] = Row(tick.mid, tick)
        row.tick = tick
        row.arrivals.append(now)
        while row.arrivals and row.arrivals[0] < now - RATE_WINDOW:
            row.arrivals.popleft()

    def event(self, event: Event) -> None:
        if isinstance(event, State):
            self.status = event.state + (f" {event.url}" if event.url else "")
            self.reconnects += event.state == "reconnecting"
            if event.reason:
                self.note = event.reason
        elif isinstance(event, Reset):
            self.resets += 1
            self.note = f"{event.symbol}: reset ({event.reason})"
        elif isinstance(event, Anomaly):
            self.anomalies += 1
            self.note = f"{event.symbol}: unannounced {event.kind}"
        elif isinstance(event, Error):
            self.note = f"error {event.code}: {event.message}"
        elif isinstance(event, Subscribed) and event.recovered:
            ok = sum(event.recovered.values())
            self.note = f"resumed {ok} of {len(event.recovered)} symbols exactly"

    def render(self, now: float, wall: float) -> list[str]:
        lines = [f"{'symbol':<8}{'bid':>12}{'ask':>12}{'change':>11}{'ticks/s':>9}{'seq':>10}{'age':>8}"]
        for symbol in self.symbols:
            row = self.rows.get(symbol)
            if row is None:
                lines.append(f"{symbol:<8}{'-':>12}{'-':>12}{'':>11}{'':>9}{'':>10}{'':>8}")
                continue
            t = row.tick
            span = min(RATE_WINDOW, max(now - self.started, 1e-3))
            rate = sum(a >= now - RATE_WINDOW for a in row.arrivals) / span
            change = (t.mid - row.first_mid) / row.first_mid * 100 if row.first_mid else 0.0
            age = max(0.0, wall - t.ts / 1000)
            seq = "" if t.seq is None else str(t.seq)
            lines.append(f"{symbol:<8}{t.bid:>12}{t.ask:>12}{change:>+10.3f}%{rate:>9.1f}{seq:>10}{age:>7.1f}s")
        lines.append(f"{self.status}  reconnects {self.reconnects}  resets {self.resets}  "
                     f"anomalies {self.anomalies}  {self.note}")
        return lines


class _Screen:
    """Redraws the table in place with plain ANSI escapes (cursor up, clear line)."""

    def __init__(self, table: Table, out: TextIO) -> None:
        self.table, self.out, self.drawn = table, out, 0

    def draw(self) -> None:
        lines = self.table.render(time.monotonic(), time.time())
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "".join(f"{line}\x1b[K\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    async def run(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(REDRAW_INTERVAL)


async def tail(
    url: str | Sequence[str], key: str, symbols: list[str], *, count: int = 0, duration: float = 0.0,
    raw: bool = False, table: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
) -> int:
    """Follow `symbols` until `count` ticks or `duration` seconds (0 = no limit), reconnecting and
    resuming; return the ticks seen. `raw`: JSON lines; `table`: a live table; else tick lines.
    Raises `fxproxy.client.ClientError` when the server says not to reconnect."""
    view = Table(symbols) if table and not raw else None
    screen = _Screen(view, out) if view is not None else None
    seen = 0

    async def follow() -> None:
        nonlocal seen
        async with Client(url, key, symbols) as client:
            async for event in client:
                if raw:
                    out.write(event_json(event).decode() + "\n")
                    out.flush()
                elif view is not None and isinstance(event, Tick):
                    view.update(event, time.monotonic())
                elif view is not None:
                    view.event(event)
                elif isinstance(event, Tick):
                    print(format_tick(event), file=out, flush=True)
                elif (line := describe(event)) is not None:
                    print(line, file=err, flush=True)
                if isinstance(event, Tick):
                    seen += 1
                    if count and seen >= count:
                        return

    redraw = None
    if screen is not None and view is not None:
        view.started = time.monotonic()
        redraw = asyncio.create_task(screen.run())
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration or None):
                await follow()
    finally:
        if redraw is not None and screen is not None:
            redraw.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await redraw
            screen.draw()
    return seen
