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
