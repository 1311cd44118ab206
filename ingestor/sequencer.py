"""Per-symbol sequence numbers that grow by one and survive an ingestor restart."""

from __future__ import annotations

from collections.abc import Mapping

from shared.tick import Quote, Tick, seq_of


class Sequencer:
    def __init__(self, start: Mapping[str, int] | None = None) -> None:
        self._seq: dict[str, int] = dict(start or {})

    @classmethod
    def from_last(cls, last: Mapping[str, bytes]) -> Sequencer:
        """Continue from the last published tick per symbol, so clients never see seq go back."""
        start: dict[str, int] = {}
        for symbol, payload in last.items():
            try:
                start[symbol] = seq_of(payload)
            except ValueError:
                continue
        return cls(start)

    def number(self, quote: Quote) -> Tick:
        seq = self._seq.get(quote.symbol, 0) + 1
        self._seq[quote.symbol] = seq
        return Tick.from_quote(quote, seq)
