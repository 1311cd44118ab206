"""The edge's reader of a single-Redis or Sentinel bus: one classic pub/sub connection for the
control channel and every subscribed symbol's tick channel.

A loss is always reported and repaired the same way: the connection failed, or did not answer its
own PING in time (a hung or partitioned Redis, shared/pubsub_liveness.py) → on_state(False), a
new connection (with Sentinel, each one asks the sentinels where the primary is now), the whole
set subscribed again, on_state(True) and on_resubscribed(every symbol), on which the hub refills
them from history. A (re)connect that gets no answer within ANSWER_DEADLINE is given up and tried
again soon, so a primary the sentinels have replaced is not waited on for ever; short pauses
between attempts mean a Redis that hung answers a new one within half a second of waking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Collection

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.bus import ControlHandler, ResubscribedHandler, StateHandler, TickHandler
from shared.names import Names
from shared.pubsub_liveness import ANSWER_DEADLINE, PongWatch

log = logging.getLogger("fxproxy.bus")

RETRY_MAX = 0.5  # longest pause between two connection attempts, seconds


class RedisSubscriber:
    def __init__(
        self, client: Redis, names: Names, on_tick: TickHandler, on_control: ControlHandler,
        on_state: StateHandler, on_resubscribed: ResubscribedHandler | None = None,
    ) -> None:
        self._client = client  # of its own: closed when run() ends
        self._names = names
        self._on_tick = on_tick
        self._on_control = on_control
        self._on_state = on_state
        self._on_resubscribed = on_resubscribed
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()  # what the live connection has been told
        self._pubsub: PubSub | None = None
        self._failed: BaseException | None = None  # a subscription change failed on _pubsub
        self._connected = False
        # Every (un)subscribe and the (re)connect hold this: a symbol the hub adds while the
        # connection is being made is reconciled once it is, never lost in between.
        self._changing = asyncio.Lock()
        self._control = names.control.encode()
        self._tick_prefix = names.tick_channel_prefix.encode()
        self._symbol_of: dict[bytes, str] = {}

    @property
    def connected(self) -> bool:
        return self._connected

    async def subscribe(self, symbols: Collection[str]) -> None:
        self._wanted.update(symbols)
        async with self._changing:
            await self._sync()

    async def unsubscribe(self, symbols: Collection[str]) -> None:
        self._wanted.difference_update(symbols)
        async with self._changing:
            await self._sync()

    async def _sync(self) -> None:
        """Make the live connection's subscriptions the wanted set; the caller holds `_changing`.
        Without a connection, run() subscribes the whole set when it has one."""
        pubsub = self._pubsub
        while pubsub is not None and pubsub is self._pubsub and self._failed is None:
            add = self._wanted - self._subscribed
            drop = self._subscribed - self._wanted
            if not add and not drop:
                return
            try:
                async with asyncio.timeout(ANSWER_DEADLINE):
                    if drop:
                        await pubsub.unsubscribe(*map(self._names.tick_channel, drop))
                        self._subscribed -= drop
                    if add:
                        await pubsub.subscribe(*map(self._names.tick_channel, add))
                        self._subscribed |= add
            except (RedisError, OSError) as exc:
                # The reader ends this connection at its next turn; the next one has every symbol.
                log.warning("bus subscription change failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._failed = exc

    async def run(self) -> None:
        delay = 0.1
        try:
            while True:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                try:
                    async with self._changing:
                        self._failed = None
                        symbols = set(self._wanted)  # the hub may add more during the await
                        async with asyncio.timeout(ANSWER_DEADLINE):
                            await pubsub.subscribe(self._names.control,
                                                   *map(self._names.tick_channel, symbols))
                        self._subscribed = symbols
                        self._pubsub = pubsub
                        self._connected = True
                        self._on_state(True)
                        if self._on_resubscribed is not None and self._subscribed:
                            # Pub/sub dropped what was published while we were away.
                            self._on_resubscribed(sorted(self._subscribed))
                    delay = 0.1
                    await self._read(pubsub)
                except (RedisError, OSError) as exc:  # TimeoutError is an OSError
                    log.warning("bus subscriber lost", extra={"error": f"{type(exc).__name__}: {exc}",
                                                              "retry_s": delay})
                finally:
                    self._pubsub = None
                    self._subscribed = set()
                    if self._connected:
                        self._connected = False
                        self._on_state(False)
                    await _close_quietly(pubsub)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RETRY_MAX)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()

    async def _read(self, pubsub: PubSub) -> None:
        prefix_len = len(self._tick_prefix)
        symbol_of = self._symbol_of
        watch = PongWatch(pubsub, check=self._check)
        while True:
            msg = await watch.next_message()
            if msg["type"] != "message":
                continue
            channel: bytes = msg["channel"]
            if channel == self._control:
                self._on_control(msg["data"])
                continue
            symbol = symbol_of.get(channel)
            if symbol is None:
                symbol = symbol_of[channel] = channel[prefix_len:].decode()
            self._on_tick(symbol, msg["data"])


    def _check(self) -> None:
        if self._failed is not None:
            raise RedisConnectionError(f"a subscription change failed: {self._failed}")


async def _close_quietly(pubsub: PubSub) -> None:
    with contextlib.suppress(RedisError, OSError):
        async with asyncio.timeout(ANSWER_DEADLINE):
            await pubsub.aclose()
