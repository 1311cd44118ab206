"""One client's outgoing queue: coalesced writes, a byte budget, conflation when behind, never blocking."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edge import metrics
from edge.protocol import frame_payload, text_frame
from shared.tick import mark


class Flusher:
    """Writes each dirty writer's frames as one write, once per loop turn (or write delay)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.dirty: list[Writer] = []
        self._delay = delay
        self._scheduled = False

    def mark(self, writer: Writer) -> None:
        self.dirty.append(writer)
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if self._delay:
                loop.call_later(self._delay, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self.dirty = self.dirty, []
        for writer in dirty:
            writer.flush()


class Writer:
    """Everything sent to a client waits in `pending` until the flusher runs.

    The client is *behind* while its transport is over the high-water mark (`paused`) or it
    has not answered a lag probe within FXPROXY_MAX_LAG (`lagging`): ticks are then conflated
    (latest per symbol) and, if it stays behind for the slow-client timeout, it is closed.
    Other frames count against `budget` bytes; a client that overruns it is closed too.
    """

    __slots__ = (
        "_flusher", "_on_slow", "_slow_timeout", "_slow_timer", "_transport", "budget",
        "closed", "conflated", "dirty", "lagging", "mark_conflated", "paused", "pending",
        "pending_bytes", "sealed", "wrote",
    )

    def __init__(
        self, transport: asyncio.WriteTransport, flusher: Flusher, budget: int,
        slow_timeout: float, on_slow: Callable[[str], None], mark_conflated: bool = True,
    ) -> None:
        self._transport = transport
        self._flusher = flusher
        self._slow_timeout = slow_timeout
        self._on_slow = on_slow
        self._slow_timer: asyncio.TimerHandle | None = None
        self.budget = budget
        self.mark_conflated = mark_conflated  # native frames say which ticks skipped others
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.conflated: dict[str, tuple[bytes, bool]] = {}
        self.wrote = False  # something was written since the last lag probe
        self.dirty = False
        self.paused = False
        self.lagging = False
        self.sealed = False  # a close frame is queued: nothing may follow it
        self.closed = False  # the connection is gone

    @property
    def behind(self) -> bool:
        return self.paused or self.lagging

    def room(self) -> int:
        return self.budget - self.pending_bytes

    def send(self, frame: bytes, *, protocol: bool = False) -> bool:
        """Queue a frame that is never conflated (reply, snapshot, replay, pong, close).

        Over the budget the client is closed as too slow and False is returned. Protocol
        frames (pongs, close) skip the budget: they are small and the frames that cause them
        are rate limited.
        """
        if self.sealed:
            return False
        if not protocol and self.pending_bytes + len(frame) > self.budget:
            self._on_slow("its outgoing buffer is full")
            return False
        self._queue(frame)
        return True

    def send_tick(self, symbol: str, frame: bytes) -> None:
        # The hot path: called once per delivery, so the common case is inlined.
        if self.paused or self.lagging or self.sealed:
            if not self.sealed:
                old = self.conflated.get(symbol)
                if old is not None:
                    metrics.CONFLATED.inc()
                self.conflated[symbol] = (frame, old is not None)
            return
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        if not self.dirty:
            self.dirty = True
            self._flusher.mark(self)

    def forget(self, symbol: str) -> None:
        """Drop a conflated tick that a reset makes obsolete (it must not follow the reset)."""
        self.conflated.pop(symbol, None)

    def _queue(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        if not self.dirty and not self.paused:
            self.dirty = True
            self._flusher.mark(self)

    def flush(self, force: bool = False) -> None:
        """Write what is pending in one write; `force` writes even over the high-water mark."""
        self.dirty = False
        if self.closed or (self.paused and not force) or not self.pending:
            return
        pending = self.pending
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()
        self.pending_bytes = 0
        self.wrote = True

    def drop_pending(self) -> None:
        """Forget queued ticks and replies: a client closed for being slow gets the close at once."""
        self.pending.clear()
        self.pending_bytes = 0
        self.conflated.clear()

    def pause(self) -> None:
        """The transport's buffer is over its high-water mark."""
        self.paused = True
        self._behind_changed()

    def resume(self) -> None:
        self.paused = False
        self._behind_changed()

    def set_lagging(self, lagging: bool) -> None:
        if lagging and not self.lagging:
            metrics.LAGGING.inc()
        self.lagging = lagging
        self._behind_changed()

    def _behind_changed(self) -> None:
        if self.paused or self.lagging:
            if self._slow_timer is None and not self.closed:
                self._slow_timer = asyncio.get_running_loop().call_later(
                    self._slow_timeout, self._on_slow, "it stayed behind"
                )
            return
        self._cancel_slow_timer()
        for frame, skipped in self.conflated.values():
            if skipped and self.mark_conflated:
                frame = text_frame(mark(frame_payload(frame), b"conflated"))
            self._queue(frame)
        self.conflated.clear()
        if self.pending and not self.dirty:
            self.dirty = True
            self._flusher.mark(self)

    def _cancel_slow_timer(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None

    def seal(self) -> None:
        self.sealed = True
        self.conflated.clear()
        self._cancel_slow_timer()

    def close(self) -> None:
        self.sealed = self.closed = True
        self.drop_pending()
        self._cancel_slow_timer()
