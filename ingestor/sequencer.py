"""Per-symbol positions (epoch, seq): seq grows by one; an epoch ends only when all state is lost."""

from __future__ import annotations

from collections.abc import Mapping

from shared.tick import Position, Quote, Tick, new_epoch, position_of


class Sequencer:
    """Lives as long as the process, across leadership terms, so memory can outlast Redis."""

    def __init__(self, start: Mapping[str, Position] | None = None) -> None:
        self._pos: dict[str, Position] = dict(start or {})

    def positions(self) -> dict[str, Position]:
        return dict(self._pos)

    def merge(self, last: Mapping[str, bytes]) -> None:
        """Continue from the newer of memory and Redis's last ticks (new term, or Redis came back).

        Redis wins when its epoch differs: another leader has numbered the symbol since.
        """
        for symbol, payload in last.items():
            try:
                stored = position_of(payload)
            except ValueError:
                continue
            mine = self._pos.get(symbol)
            if mine is None or mine.epoch != stored.epoch or stored.seq > mine.seq:
                self._pos[symbol] = stored

    def number(self, quote: Quote) -> Tick:
        pos = self._pos.get(quote.symbol)
        pos = Position(new_epoch(), 1) if pos is None else Position(pos.epoch, pos.seq + 1)
        self._pos[quote.symbol] = pos
        return Tick.from_quote(quote, pos.epoch, pos.seq)
