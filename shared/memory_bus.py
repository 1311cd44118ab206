"""In-process bus for single-process mode (`fxproxy demo`) and fast tests."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection, Sequence

from shared.bus import (
    AwayHandler,
    ControlHandler,
    Message,
    ResubscribedHandler,
    StateHandler,
    TickHandler,
)
from shared.names import Names


class MemorySubscriber:
    def __init__(
        self, bus: MemoryBus, on_tick: TickHandler, on_control: ControlHandler,
        on_state: StateHandler,
    ) -> None:
        self._bus = bus
        self.symbols: set[str] = set()
        self.on_tick = on_tick
        self.on_control = on_control
        self._on_state = on_state

    @property
    def connected(self) -> bool:
        return True

    async def subscribe(self, symbols: Collection[str]) -> None:
        self.symbols.update(symbols)

    async def unsubscribe(self, symbols: Collection[str]) -> None:
        self.symbols.difference_update(symbols)

    async def run(self) -> None:
        self._bus.subscribers.append(self)
        self._on_state(True)
        try:
            await self._bus.closed.wait()
        finally:
            self._bus.subscribers.remove(self)


class MemoryBus:
    def __init__(self, names: Names | None = None, history_len: int = 1000) -> None:
        self.names = names or Names()
        self.subscribers: list[MemorySubscriber] = []
        self._last: dict[str, bytes] = {}
        self._history: dict[str, deque[tuple[int, bytes]]] = {}
        self._history_len = history_len
        self.closed = asyncio.Event()

    async def publish(self, messages: Sequence[Message], fence: str = "") -> None:
        for symbol, seq, payload in messages:
            self._last[symbol] = payload
            hist = self._history.get(symbol)
            if hist is None or seq == 1:  # seq 1 opens a new epoch: older history is another stream
                hist = self._history[symbol] = deque(maxlen=self._history_len)
            hist.append((seq, payload))
            for sub in self.subscribers:
                if symbol in sub.symbols:
                    sub.on_tick(symbol, payload)

    async def last(self, symbols: Collection[str] | None = None) -> dict[str, bytes]:
        if symbols is None:
            return dict(self._last)
        return {s: self._last[s] for s in symbols if s in self._last}

    async def history(self, symbol: str, after_seq: int, limit: int) -> list[bytes]:
        entries = [p for seq, p in self._history.get(symbol, ()) if seq > after_seq]
        return entries[:limit]

    async def publish_control(self, event: bytes) -> None:
        for sub in self.subscribers:
            sub.on_control(event)

    def subscriber(
        self, on_tick: TickHandler, on_control: ControlHandler, on_state: StateHandler,
        on_resubscribed: ResubscribedHandler | None = None, on_away: AwayHandler | None = None,
    ) -> MemorySubscriber:
        # Nothing is ever lost in process: no resubscriptions, nothing away.
        return MemorySubscriber(self, on_tick, on_control, on_state)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.closed.set()
