"""The upstream pool: the wanted symbols spread over as few vendor sessions as the vendor's limits
allow, each session failing and recovering on its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.packing import plan
from ingestor.vendors import SILENT, Hooks, VendorSession, carries, open_session
from shared.settings import IngestorSettings
from shared.tick import Quote

log = logging.getLogger("fxproxy.ingestor.pool")

# Seconds before a symbol the vendor had no room for on a session is asked for there again (kabu:
# other apps share the registration list, and free places without telling us).
CAPACITY_RETRY = 30.0
# A timer may wake the pool a hair before what it was set for: within this, it counts as due
# (else the wake-up would find nothing due and no later one would come).
DUE_SLACK = 0.01


class UpstreamPool:
    """`want()` says what to stream; `run()` opens, changes and closes sessions to match.

    Statuses go to `on_status(symbol, status)` once per change: "streaming" (the vendor accepted
    it), "capacity" (over FXPROXY_UPSTREAM_MAX_SYMBOLS x FXPROXY_UPSTREAM_MAX_CONNECTIONS; static
    symbols go first), "unknown" (the vendor does not carry it, or an on-demand symbol stayed
    silent while others quoted; never a configured one by silence), forgotten when it leaves the
    wanted set so a later caller tries afresh. `connected` is set while every session that has
    symbols is logged in. A session that fails (an exception out of its `run()`) is logged,
    counted and reopened after its own backoff; the others stream on. A session that reports
    "capacity" for a symbol (the vendor's own limit, shared with others) loses it to a session with
    room, else it is refused; either way it is tried there again after CAPACITY_RETRY.
    """

    def __init__(self, settings: IngestorSettings, on_quote: Callable[[Quote], None],
                 on_status: Callable[[str, str], None], *,
                 connected: asyncio.Event | None = None) -> None:
        self._settings = settings
        self._on_quote = on_quote
        self._on_status = on_status
        self.connected = connected or asyncio.Event()
        self._static = list(dict.fromkeys(settings.symbols))
        self._configured = frozenset(self._static)
        self._silent_static: set[str] = set()  # configured symbols not quoting yet (logged once)
        self._per_session = settings.symbols_per_session()
        self._slots: list[VendorSession | None] = [None] * settings.upstream_max_connections
        self._tasks: list[asyncio.Task[None] | None] = [None] * settings.upstream_max_connections
        # A failed slot keeps its symbols (and its place in the plan) until it is reopened.
        self._reopen_at: dict[int, float] = {}
        self._started: list[float] = [0.0] * settings.upstream_max_connections
        self._backoffs = [Backoff(settings.backoff_initial, settings.backoff_max)
                          for _ in range(settings.upstream_max_connections)]
        self._order: tuple[str, ...] = ()
        self._wanted: frozenset[str] = frozenset()
        self._unknown: set[str] = set()
        self._held_out: dict[str, dict[int, float]] = {}  # symbol -> slot -> no room there until
        self._status: dict[str, str] = {}
        self._dirty = asyncio.Event()

    def want(self, symbols: Collection[str]) -> None:
        """The whole set to stream now (sync, returns at once); run() reconciles sessions to it."""
        # In the caller's order (static first, then on-demand ones as first wanted): when capacity
        # is short, the symbols asked for longest keep their place.
        self._order = tuple(dict.fromkeys(symbols))
        self._wanted = frozenset(self._order)
        # Unknown only while wanted: the next subscriber after a drop is tried afresh (the vendor
        # may carry it by then, or it was silent at a bad moment).
        self._unknown &= self._wanted
        self._silent_static &= self._wanted
        for symbol in set(self._held_out) - self._wanted:
            del self._held_out[symbol]
        for symbol in set(self._status) - self._wanted:
            del self._status[symbol]  # asked for again later: reported again
        # A symbol this vendor cannot even name (9433@1 on a forex feed) is unknown to it.
        self._unknown |= {s for s in self._wanted if not carries(self._settings, s)}
        self._dirty.set()

    def streamed(self) -> frozenset[str]:
        """Symbols on a session now (accepted, or awaiting the vendor's first word)."""
        out: set[str] = set()
        for session in self._slots:
            if session is not None:
                out |= session.symbols
        return frozenset(out - self._unknown)

    async def run(self) -> None:
        """Until cancelled; then every session is closed."""
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                self._reconcile()
        finally:
            tasks = [t for t in self._tasks if t is not None]
            for task in tasks:
                task.cancel()
            # Every outcome retrieved, a failed session's error included (logged already).
            await asyncio.gather(*tasks, return_exceptions=True)
            self._slots = [None] * len(self._slots)
            self._tasks = [None] * len(self._tasks)
            self._reopen_at.clear()
            self._link_changed()

    def _priority(self) -> list[str]:
        """Static symbols first (in configured order), then on-demand ones already streamed, then
        new ones, each in the order they were first wanted: a newcomer never pushes out a symbol
        clients are being sent."""
        static = [s for s in self._static if s in self._wanted and s not in self._unknown]
        current = self.streamed()
        rest = [s for s in self._order if s not in self._unknown and s not in static]
        return static + [s for s in rest if s in current] + [s for s in rest if s not in current]

    def _reconcile(self) -> None:
        self._note_failures()
        for symbol in self._wanted & self._unknown:
            self._report(symbol, "unknown")
        current = [s.symbols if s is not None else frozenset() for s in self._slots]
        priority = self._priority()
        layout = plan(current, priority, self._per_session, len(self._slots), self._excluded())
        for symbol in layout.refused:
            if self._status.get(symbol) != "capacity":
                log.warning("symbol refused: over the vendor's limits",
                            extra={"symbol": symbol, "max_symbols": self._per_session,
                                   "max_connections": len(self._slots)})
            self._report(symbol, "capacity")
        for slot, symbols in enumerate(layout.sessions):
            self._apply(slot, [s for s in priority if s in symbols])
        metrics.UPSTREAM_SYMBOLS.set(len(self.streamed()))
        self._link_changed()

    def _excluded(self) -> dict[str, list[int]]:
        """Slots each symbol is held out of now (the vendor said no room); expired ones dropped."""
        now = asyncio.get_running_loop().time() + DUE_SLACK
        out: dict[str, list[int]] = {}
        for symbol, slots in list(self._held_out.items()):
            live = {slot: until for slot, until in slots.items() if until > now}
            if live:
                self._held_out[symbol] = live
                out[symbol] = list(live)
            else:
                del self._held_out[symbol]
        return out

    def _note_failures(self) -> None:
        """Sessions whose run() ended (a bug, or an error the driver did not expect): logged with
        the traceback, counted, and reopened after the slot's backoff."""
        loop = asyncio.get_running_loop()
        for slot, task in enumerate(self._tasks):
            if task is None or not task.done() or slot in self._reopen_at:
                continue
            error = None if task.cancelled() else task.exception()
            metrics.SESSION_FAILURES.inc()
            if loop.time() - self._started[slot] >= self._backoffs[slot].maximum:
                self._backoffs[slot].reset()  # it ran well for a while: this is a new failure
            delay = self._backoffs[slot].next_delay()
            log.error("upstream session failed: reopening it", exc_info=error, extra={
                "session": slot, "in_s": round(delay, 2),
                "error": f"{type(error).__name__}: {error}" if error else "ended by itself"})
            self._reopen_at[slot] = loop.time() + delay
            loop.call_later(delay, self._dirty.set)

    def _apply(self, slot: int, symbols: list[str]) -> None:
        """Give `slot` these symbols (in priority order): open, change or close its session."""
        session, task = self._slots[slot], self._tasks[slot]
        reopen_at = self._reopen_at.get(slot)
        if reopen_at is not None:
            if symbols and asyncio.get_running_loop().time() + DUE_SLACK < reopen_at:
                assert session is not None
                session.change(symbols)  # recorded on the dead session: applied when it reopens
                return
            del self._reopen_at[slot]
            self._slots[slot] = self._tasks[slot] = session = task = None
        if session is not None and frozenset(symbols) == session.symbols:
            return
        if not symbols:
            if task is not None:
                log.info("closing upstream session", extra={"session": slot})
                task.cancel()
            self._slots[slot] = self._tasks[slot] = None
            return
        if session is not None:
            session.change(symbols)
            return
        hooks = Hooks(self._on_quote, lambda sym, status: self._vendor_status(sym, status, slot),
                      self._link_changed)
        session = open_session(self._settings, slot, symbols, hooks)
        log.info("opening upstream session", extra={"session": slot, "symbols": len(symbols)})
        self._slots[slot] = session
        self._started[slot] = asyncio.get_running_loop().time()
        new = asyncio.create_task(session.run(), name=f"upstream-session-{slot}")
        new.add_done_callback(lambda _: self._dirty.set())
        self._tasks[slot] = new

    def _vendor_status(self, symbol: str, status: str, slot: int) -> None:
        if symbol not in self._wanted:
            return  # dropped meanwhile: a late word about it binds nothing
        if status == "capacity":
            # No room on this session's vendor side: placed elsewhere, or refused by the next
            # plan (which reports it), and tried here again after CAPACITY_RETRY.
            loop = asyncio.get_running_loop()
            log.warning("vendor has no room for a symbol on this session", extra={
                "symbol": symbol, "session": slot, "retry_s": CAPACITY_RETRY})
            self._held_out.setdefault(symbol, {})[slot] = loop.time() + CAPACITY_RETRY
            loop.call_later(CAPACITY_RETRY, self._dirty.set)
            self._dirty.set()
            return
        if status == SILENT:
            if symbol in self._configured:
                if symbol not in self._silent_static:
                    self._silent_static.add(symbol)
                    log.warning("configured symbol not quoting while others do: still asked for",
                                extra={"symbol": symbol})
                return
            status = "unknown"
        if status == "unknown" and symbol not in self._unknown:
            self._unknown.add(symbol)
            self._dirty.set()  # take it off its session: it must not hold a place
        self._report(symbol, status)

    def _report(self, symbol: str, status: str) -> None:
        if self._status.get(symbol) != status:
            self._status[symbol] = status
            self._on_status(symbol, status)

    def _link_changed(self) -> None:
        up = all(s.up and slot not in self._reopen_at for slot, s in enumerate(self._slots)
                 if s is not None)
        metrics.UPSTREAM_UP.set(1 if up and any(self._slots) else 0)
        if up and any(self._slots):
            self.connected.set()
        else:
            self.connected.clear()
