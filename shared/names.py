"""Redis key and channel names, all under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str = "fx:"

    def tick_channel(self, symbol: str) -> str:
        return f"{self.prefix}tick:{symbol}"

    @property
    def tick_channel_prefix(self) -> str:
        return f"{self.prefix}tick:"

    @property
    def last(self) -> str:
        return f"{self.prefix}last"

    def history(self, symbol: str) -> str:
        return f"{self.prefix}hist:{symbol}"

    def key_record(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    @property
    def key_names(self) -> str:
        """Hash name -> key hash, so admins can revoke by name and names stay unique."""
        return f"{self.prefix}keynames"

    def connections(self, key_hash: str) -> str:
        return f"{self.prefix}conns:{key_hash}"

    @property
    def control(self) -> str:
        return f"{self.prefix}ctl"

    @property
    def edges(self) -> str:
        return f"{self.prefix}edges"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    # The keys of symbols on demand (not per symbol), each built by _shared_key so that
    # a cluster layout can give them all one hash tag: SUNION over fx:demand:* needs that.

    def _shared_key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def demand(self, edge_id: str) -> str:
        """Set of the symbols an edge's clients want, with the edge's heartbeat TTL."""
        return self._shared_key(f"demand:{edge_id}")

    @property
    def catalog(self) -> str:
        """What clients may call up: the static symbols and the on-demand globs."""
        return self._shared_key("catalog")

    @property
    def symbol_status(self) -> str:
        """Hash symbol -> upstream status (streaming, capacity, unknown)."""
        return self._shared_key("symstatus")
