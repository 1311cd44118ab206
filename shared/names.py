"""Redis key and channel names, all under one configurable prefix.

With `cluster=True` the names fit Redis Cluster: everything of one symbol shares a slot through
the hash tag `{SYMBOL}` (`fx:{EURUSD}:tick|hist|last|fence`), so a symbol's batch is one script
call on the shard that owns it; everything else lives in the one slot of `{meta}`, so the
multi-key scripts of the keystore and the lease keep working. Single mode keeps today's names.
"""

from __future__ import annotations

from dataclasses import dataclass

META_TAG = "{meta}"


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str = "fx:"
    cluster: bool = False

    def meta(self, name: str) -> str:
        """A name outside any symbol (keys, edges, lease, control, ...): new keys use this, so
        on a cluster they share the slot that multi-key scripts need."""
        return f"{self.prefix}{META_TAG}:{name}" if self.cluster else f"{self.prefix}{name}"

    def _symbol(self, symbol: str, kind: str) -> str:
        return f"{self.prefix}{{{symbol}}}:{kind}"

    def tick_channel(self, symbol: str) -> str:
        """Classic channel in single mode; a sharded channel (SPUBLISH) on a cluster."""
        return self._symbol(symbol, "tick") if self.cluster else f"{self.prefix}tick:{symbol}"

    @property
    def tick_channel_prefix(self) -> str:
        """Single mode: what precedes the symbol in a tick channel."""
        return f"{self.prefix}tick:"

    @property
    def last(self) -> str:
        """Single mode: the hash of last ticks by symbol."""
        return f"{self.prefix}last"

    def last_value(self, symbol: str) -> str:
        """Cluster mode: the symbol's last tick, a string in the symbol's slot."""
        return self._symbol(symbol, "last")

    def fence(self, symbol: str) -> str:
        """Cluster mode: the newest lease token that published this symbol (see cluster_bus)."""
        return self._symbol(symbol, "fence")

    def history(self, symbol: str) -> str:
        return self._symbol(symbol, "hist") if self.cluster else f"{self.prefix}hist:{symbol}"

    def key_record(self, key_hash: str) -> str:
        return self.meta(f"key:{key_hash}")

    @property
    def key_names(self) -> str:
        """Hash name -> key hash, so admins can revoke by name and names stay unique."""
        return self.meta("keynames")

    def connections(self, key_hash: str) -> str:
        return self.meta(f"conns:{key_hash}")

    @property
    def control(self) -> str:
        return self.meta("ctl")

    @property
    def edges(self) -> str:
        return self.meta("edges")

    @property
    def leader(self) -> str:
        return self.meta("leader")

    @property
    def epoch(self) -> str:
        return self.meta("epoch")

    # The keys of symbols on demand live in the meta slot too: SUNION over fx:demand:* needs that.

    def demand(self, edge_id: str) -> str:
        """Set of the symbols an edge's clients want, with the edge's heartbeat TTL."""
        return self.meta(f"demand:{edge_id}")

    @property
    def catalog(self) -> str:
        """What clients may call up: the static symbols and the on-demand globs."""
        return self.meta("catalog")

    @property
    def symbol_status(self) -> str:
        """Hash symbol -> the leader's verdict (streaming:EPOCH:SEQ, capacity, unknown)."""
        return self.meta("symstatus")

    @property
    def on_demand_handover(self) -> str:
        """The leader's on-demand symbols in priority order with their grace, for the next one."""
        return self.meta("ondemand")
