"""Who on this edge wants which symbol; one bus subscription per symbol, reference counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

from edge import metrics
from edge.protocol import text_frame
from edge.writer import Writer
from shared.bus import Subscriber
from shared.tick import seq_of, to_tradermade

# A seq this far below the last one means the sequence restarted (new ingestor and an
# empty Redis), not a duplicate: accept it rather than drop the symbol forever.
RESTART_WINDOW = 10_000


class Hub:
    """Subscribing is two steps: `acquire` (bus) then `attach` (writer).

    A connection acquires, reads the snapshot, then attaches with no await in between, so
    every tick the hub sees after the snapshot reaches the client, and none before it.
    """

    def __init__(self) -> None:
        self.subscriber: Subscriber | None = None
        self._refs: Counter[str] = Counter()
        self._native: dict[str, set[Writer]] = {}
        self._tm: dict[str, set[Writer]] = {}
        self._last: dict[str, tuple[int, bytes]] = {}
        self._held: list[tuple[str, bytes]] = []  # live ticks held while recoveries run
        self._holds = 0

    def symbols(self) -> set[str]:
        return set(self._refs)

    def last(self, symbol: str) -> tuple[int, bytes] | None:
        """The newest tick this edge has seen for a symbol it is subscribed to."""
        return self._last.get(symbol)

    async def acquire(self, symbols: Iterable[str]) -> None:
        new = []
        for symbol in symbols:
            if self._refs[symbol] == 0:
                new.append(symbol)
            self._refs[symbol] += 1
        if new:
            metrics.SUBSCRIBED_SYMBOLS.set(len(self._refs))
            if self.subscriber is not None:
                # Shielded: the counts above are already updated, so the bus must follow
                # even if the client that asked is gone and its task cancelled.
                await asyncio.shield(self.subscriber.subscribe(new))

    async def release(self, symbols: Iterable[str]) -> None:
        gone = []
        for symbol in symbols:
            self._refs[symbol] -= 1
            if self._refs[symbol] <= 0:
                del self._refs[symbol]
                self._last.pop(symbol, None)
                gone.append(symbol)
        if gone:
            metrics.SUBSCRIBED_SYMBOLS.set(len(self._refs))
            if self.subscriber is not None:
                await asyncio.shield(self.subscriber.unsubscribe(gone))

    def attach(self, writer: Writer, symbols: Iterable[str], tradermade: bool = False) -> None:
        table = self._tm if tradermade else self._native
        for symbol in symbols:
            table.setdefault(symbol, set()).add(writer)

    def detach(self, writer: Writer, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            for table in (self._native, self._tm):
                writers = table.get(symbol)
                if writers is not None:
                    writers.discard(writer)
                    if not writers:
                        del table[symbol]

    def hold(self) -> dict[str, int]:
        """Start recovering after a bus outage: hold live ticks; return the last seq per symbol."""
        self._holds += 1
        return {symbol: seq for symbol, (seq, _) in self._last.items()}

    def release_held(self, missed: dict[str, list[bytes]]) -> None:
        """Deliver ticks missed during an outage; when no recovery is left, the held live ones."""
        for symbol, payloads in missed.items():
            for payload in payloads:
                self._deliver(symbol, payload)
        self._holds -= 1
        if self._holds == 0:
            held, self._held = self._held, []
            for symbol, payload in held:
                self._deliver(symbol, payload)  # seq dedupe drops what a replay already sent

    def on_tick(self, symbol: str, payload: bytes) -> None:
        """Called by the bus reader for every tick: frame once, hand the same bytes to all."""
        if self._holds:
            self._held.append((symbol, payload))
        else:
            self._deliver(symbol, payload)

    def _deliver(self, symbol: str, payload: bytes) -> None:
        metrics.MESSAGES.inc()
        try:
            seq = seq_of(payload)
        except ValueError:
            return
        prev = self._last.get(symbol)
        if prev is not None:
            last_seq = prev[0]
            if last_seq - RESTART_WINDOW < seq <= last_seq:
                metrics.DUPLICATES.inc()
                return
            if seq != last_seq + 1:
                metrics.GAPS.inc()
        if symbol in self._refs:
            self._last[symbol] = (seq, payload)
        delivered = 0
        native = self._native.get(symbol)
        if native:
            frame = text_frame(payload)
            for writer in native:
                writer.send_tick(symbol, frame)
            delivered = len(native)
        tm = self._tm.get(symbol)
        if tm:
            frame = text_frame(to_tradermade(payload))
            for writer in tm:
                writer.send_tick(symbol, frame)
            delivered += len(tm)
        metrics.DELIVERIES.inc(delivered)
