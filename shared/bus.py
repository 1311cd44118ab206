"""The bus interface between ingestor and edges; Redis and in-memory implementations."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple, Protocol

from shared.names import Names


class Message(NamedTuple):
    symbol: str
    seq: int
    payload: bytes  # the encoded tick, forwarded to clients as is


class Fenced(Exception):
    """Another ingestor leads now: a publisher holding an older token must stop."""


class PartlyPublished(Exception):
    """Part of the bus (a cluster shard) is away: the rest of the batch went out, `unpublished`
    (in the batch's order) did not and should be retried soon, without holding up the rest."""

    def __init__(self, unpublished: Sequence[Message], cause: BaseException) -> None:
        super().__init__(f"{len(unpublished)} ticks not published: {type(cause).__name__}: {cause}")
        self.unpublished = list(unpublished)


TickHandler = Callable[[str, bytes], None]
ControlHandler = Callable[[bytes], None]
# Up: the control channel is subscribed and the bus's core answers (a single Redis; on a
# cluster, the node of the `{meta}` slot that holds keys, limits and the lease). Readiness.
StateHandler = Callable[[bool], None]
# These symbols' subscriptions were made again after a loss: pub/sub dropped what was published
# meanwhile, and history has it.
ResubscribedHandler = Callable[[Collection[str]], None]
# The bus nodes (host:port) whose symbols wait for them now: a cluster shard that is away while
# the rest of the bus works. Empty when none.
AwayHandler = Callable[[Collection[str]], None]


class Subscriber(Protocol):
    """One subscription connection: the edge's single reader of the bus."""

    @property
    def connected(self) -> bool: ...

    async def subscribe(self, symbols: Collection[str]) -> None: ...

    async def unsubscribe(self, symbols: Collection[str]) -> None: ...

    async def run(self) -> None:
        """Deliver messages until cancelled, reconnecting and resubscribing on loss."""
        ...


class Bus(Protocol):
    names: Names

    async def publish(self, messages: Sequence[Message], fence: str = "") -> None:
        """Publish ticks, update last values and history, in one round trip.

        With a `fence` token, raise Fenced instead if another leader holds the lease. A bus of
        several shards raises PartlyPublished when only some of them took their ticks.
        """
        ...

    async def last(self, symbols: Collection[str] | None = None) -> dict[str, bytes]:
        """Last payload per symbol (all symbols when None)."""
        ...

    async def history(self, symbol: str, after_seq: int, limit: int) -> list[bytes]:
        """Payloads with seq > after_seq, oldest first, at most `limit`."""
        ...

    async def publish_control(self, event: bytes) -> None: ...

    def subscriber(
        self, on_tick: TickHandler, on_control: ControlHandler, on_state: StateHandler,
        on_resubscribed: ResubscribedHandler | None = None, on_away: AwayHandler | None = None,
    ) -> Subscriber: ...

    async def ping(self) -> None:
        """Raise if the bus is unreachable."""
        ...

    async def close(self) -> None: ...
