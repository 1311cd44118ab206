"""One client's outgoing queue: coalesced writes, conflation when slow, never blocking."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edge import metrics


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
    """Frames wait in `pending` until the flusher runs; a paused (slow) client is conflated."""

    __slots__ = (
        "_flusher", "_on_slow", "_slow_timeout", "_slow_timer", "_transport",
        "closed", "conflated", "dirty", "paused", "pending",
    )

    def __init__(
        self, transport: asyncio.WriteTransport, flusher: Flusher,
        slow_timeout: float, on_slow: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._flusher = flusher
        self._slow_timeout = slow_timeout
        self._on_slow = on_slow
        self._slow_timer: asyncio.TimerHandle | None = None
        self.pending: list[bytes] = []
        self.conflated: dict[str, bytes] = {}
        self.dirty = False
        self.paused = False
        self.closed = False

    def send(self, frame: bytes) -> None:
        """Queue a control frame (reply, error, snapshot): never conflated."""
        if self.closed:
            return
        self.pending.append(frame)
        if not self.dirty and not self.paused:
            self.dirty = True
            self._flusher.mark(self)

    def send_tick(self, symbol: str, frame: bytes) -> None:
        if self.paused:
            if symbol in self.conflated:
                metrics.CONFLATED.inc()
            self.conflated[symbol] = frame
            return
        self.pending.append(frame)
        if not self.dirty:
            self.dirty = True
            self._flusher.mark(self)

    def flush(self) -> None:
        self.dirty = False
        if self.closed or self.paused or not self.pending:
            return
        pending = self.pending
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()

    def write_now(self, data: bytes) -> None:
        """Write protocol bytes (handshake, pong, close) at once, after the queue unless paused."""
        self.flush()
        self._transport.write(data)

    def pause(self) -> None:
        """The transport's buffer is over its high-water mark: the client is behind."""
        self.paused = True
        if self._slow_timer is None:
            self._slow_timer = asyncio.get_running_loop().call_later(
                self._slow_timeout, self._on_slow
            )

    def resume(self) -> None:
        self.paused = False
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        if self.conflated:
            self.pending.extend(self.conflated.values())
            self.conflated.clear()
        if self.pending and not self.dirty:
            self.dirty = True
            self._flusher.mark(self)

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        self.conflated.clear()
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
