"""The cluster subscriber's bookkeeping, without I/O: which symbols are wanted, which node each
one's SSUBSCRIBE went to, which subscriptions were lost (and need a history refill once made
again), and which of our own SUNSUBSCRIBEs still have a reply on its way."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection

from shared.slot_map import Address


class Ledger:
    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.home: dict[str, Address] = {}  # symbol -> the node its SSUBSCRIBE went to
        self.lost: set[str] = set()  # subscriptions lost: refilled once made again
        # Our own SUNSUBSCRIBEs whose replies are still due, per node and channel: such a reply
        # is not a push from the server, even when the symbol was subscribed again since.
        self._leaving: Counter[tuple[Address, bytes]] = Counter()

    def want(self, symbols: Collection[str]) -> None:
        self.wanted.update(symbols)

    def drop(self, symbols: Collection[str]) -> None:
        self.wanted.difference_update(symbols)
        self.lost.difference_update(symbols)

    def stale(self) -> list[str]:
        """Subscribed but no longer wanted."""
        return [s for s in self.home if s not in self.wanted]

    def unhomed(self) -> list[str]:
        """Wanted but not subscribed anywhere."""
        return [s for s in self.wanted if s not in self.home]

    def whole(self) -> bool:
        return all(s in self.home for s in self.wanted)

    def entered(self, symbols: Collection[str], address: Address) -> None:
        for symbol in symbols:
            self.home[symbol] = address

    def leaving(self, symbols: Collection[str], channels: Collection[bytes]) -> Address:
        """Our SUNSUBSCRIBE of `channels` (the subscriptions of `symbols`, all on one node) is
        about to go out: the node they were on."""
        address = self.home[next(iter(symbols))]
        for symbol in symbols:
            del self.home[symbol]
        self._leaving.update((address, c) for c in channels)
        return address

    def node_lost(self, address: Address) -> list[str]:
        """A node's connection is gone, and every subscription on it: the symbols that lost one."""
        lost = [s for s, home in self.home.items() if home == address]
        for symbol in lost:
            del self.home[symbol]
        self.lost.update(s for s in lost if s in self.wanted)
        for key in [k for k in self._leaving if k[0] == address]:
            del self._leaving[key]
        return lost

    def moved(self, owner: Callable[[str], Address | None]) -> list[str]:
        """Symbols whose slot the map now gives another node, or none (a failover, a migration):
        subscribed where nothing is published any more, so lost."""
        moved = [s for s, home in self.home.items() if owner(s) != home]
        for symbol in moved:
            del self.home[symbol]
        self.lost.update(s for s in moved if s in self.wanted)
        return moved

    def confirmed(self, address: Address, symbol: str) -> bool:
        """An `ssubscribe` reply: True when it makes a lost subscription whole again (refill it)."""
        if symbol in self.lost and self.home.get(symbol) == address:
            self.lost.discard(symbol)
            return True
        return False

    def ended(self, address: Address, channel: bytes, symbol: str) -> bool:
        """A `sunsubscribe` from `address`: True when the server ended the symbol's subscription
        (its slot moved, or the node became a replica); False for the reply to our own, or for a
        node that is not the symbol's home (nothing of ours ended there)."""
        key = (address, channel)
        if self._leaving[key] > 0:
            self._leaving[key] -= 1
            if not self._leaving[key]:
                del self._leaving[key]
            return False
        if self.home.get(symbol) != address:
            return False
        del self.home[symbol]
        self.lost.add(symbol)
        return True

    def busy(self) -> set[Address]:
        """Nodes that hold a subscription of ours or owe us a reply."""
        return set(self.home.values()) | {a for a, _ in self._leaving}

    def pending_replies(self) -> int:
        return sum(self._leaving.values())
