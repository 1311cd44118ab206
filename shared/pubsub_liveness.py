"""Is a pub/sub connection's server still there? Each connection PINGs on its own and counts a
pong that does not come as a lost connection.

A subscriber only reads, so a server that hangs (SIGSTOP, a partition without a reset) looks
exactly like a quiet market: the socket stays open and nothing arrives. redis-py's own health
check only sends its PING and never asks for the answer. So every pub/sub connection here sends
its own PING every PING_INTERVAL and, when ANSWER_DEADLINE passes after one with nothing at all
to read, raises PongMissing, which the subscriber treats like a dropped connection. A hung node is
therefore noticed within PING_INTERVAL + ANSWER_DEADLINE (3 s); a busy one never is, since any
data that arrives (the pong waits behind it) counts as an answer still on its way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError

PING_INTERVAL = 1.0  # seconds between a pub/sub connection's own PINGs
# Seconds a Redis node has to answer (a PING, a connection's opening, a (re)subscribe) before it
# counts as away. Above the bus probe's 1.5 s: losing a subscription costs a history refill.
ANSWER_DEADLINE = 2.0
_TOKEN = b"fxproxy-liveness"


class PongMissing(RedisConnectionError):
    """The server did not answer a PING within the deadline: the connection counts as lost."""


class PongWatch:
    """Reads one pub/sub connection's messages, keeping its PINGs going; never returns a pong."""

    def __init__(self, pubsub: PubSub, interval: float = PING_INTERVAL,
                 deadline: float = ANSWER_DEADLINE, check: Callable[[], None] | None = None) -> None:
        self._pubsub = pubsub
        self._check = check  # called at least once an interval: may raise to end the reading
        self._interval = interval
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._sent_at: float | None = None
        self._next_ping = self._loop.time() + interval

    async def next_message(self) -> dict[str, Any]:
        """The next message other than our pongs; PongMissing when the server stopped answering."""
        while True:
            if self._check is not None:
                self._check()
            now = self._loop.time()
            if self._sent_at is None and now >= self._next_ping:
                # Bounded: a send can block too, once a hung server's socket buffer is full.
                async with asyncio.timeout(self._deadline):
                    await self._pubsub.ping(_TOKEN)
                self._sent_at = now
            until = self._next_ping if self._sent_at is None else self._sent_at + self._deadline
            # At least a short read even past the deadline: after the event loop was held up,
            # the pong may be waiting in the buffer already.
            msg: dict[str, Any] | None = await self._pubsub.get_message(
                timeout=max(until - self._loop.time(), 0.01))
            if msg is None:
                if self._sent_at is not None and self._loop.time() - self._sent_at >= self._deadline:
                    raise PongMissing(f"no answer to a PING within {self._deadline:g}s")
                continue
            if msg["type"] == "pong" and msg["data"] == _TOKEN:
                self._sent_at = None
                self._next_ping = self._loop.time() + self._interval
                continue
            return msg


async def answered(pubsub: PubSub, deadline: float = ANSWER_DEADLINE) -> None:
    """Connect a fresh PubSub and see one PING answered, within `deadline` (TimeoutError if not):
    a node that accepts TCP but is hung must not be taken for one that serves."""
    async with asyncio.timeout(deadline):
        await pubsub.connect()  # type: ignore[no-untyped-call]
        await pubsub.ping(_TOKEN)
        while True:
            msg = await pubsub.get_message(timeout=deadline)
            if msg is not None and msg["type"] == "pong" and msg["data"] == _TOKEN:
                return
