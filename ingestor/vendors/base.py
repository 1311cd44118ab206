"""What the upstream pool drives: one vendor session carrying a set of symbols."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from shared.tick import Quote

# What a client is told about a symbol it asked for: the vendor streams it, there is no room for it
# within the vendor's limits, or the vendor does not know it.
Status = Literal["streaming", "capacity", "unknown"]
# What a session says of a symbol that never quoted while the session delivered others' quotes:
# a guess, not the vendor's word. The pool takes it as "unknown" for on-demand symbols only; a
# configured symbol stays asked for (the vendor may simply not be quoting it yet).
SILENT = "silent"


def _ignore_status(symbol: str, status: str) -> None:
    pass


def _ignore_link() -> None:
    pass


@dataclass(slots=True)
class Hooks:
    """How a session reports back: quotes, per-symbol status, and its link going up or down."""

    on_quote: Callable[[Quote], None]
    on_status: Callable[[str, str], None] = _ignore_status
    on_link: Callable[[], None] = _ignore_link


class VendorSession(Protocol):
    """One logged-in vendor connection. `run()` opens it and keeps it open until cancelled
    (cancelling is closing); `change()` hands it a new set, applied without dropping the symbols
    that stay where the vendor allows. Symbols come in the pool's priority order (configured ones
    first): a vendor with room for only some takes the first and reports the rest "capacity"."""

    @property
    def symbols(self) -> frozenset[str]: ...

    @property
    def up(self) -> bool: ...

    def change(self, symbols: Sequence[str]) -> None: ...

    async def run(self) -> None: ...


class VendorError(Exception):
    """The vendor refused a request (bad key, limit, unknown symbol...); its own words attached."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
