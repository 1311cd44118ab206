"""The edge's reader of a Redis Cluster bus: one SSUBSCRIBE connection per primary that owns a
subscribed symbol, plus one classic SUBSCRIBE for the control channel (a cluster forwards classic
PUBLISH to every node, so any node will do).

Not redis-py's ClusterPubSub: it repairs subscriptions by itself (its per-node PubSubs reconnect
and resubscribe on error, and a slots-cache listener migrates channels in a background task), so a
failover would cost ticks that nobody notices. Here any loss (a node's connection fails, a reply is
MOVED, the server pushes a `sunsubscribe` because the slot moved or its primary became a replica)
ends the whole generation: on_state(False), a fresh slot map from CLUSTER SLOTS, every connection
and subscription made anew, then on_state(True), on which the hub refills every symbol from history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Collection
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.crc import key_slot
from redis.exceptions import RedisError

from shared.bus import ControlHandler, StateHandler, TickHandler
from shared.names import Names
from shared.redis_url import RedisTarget, connect

log = logging.getLogger("fxproxy.bus")

Address = tuple[str, int]


class _Lost(Exception):
    """The generation's subscriptions no longer cover what they should."""


class ClusterSubscriber:
    def __init__(self, target: RedisTarget, names: Names, on_tick: TickHandler,
                 on_control: ControlHandler, on_state: StateHandler) -> None:
        self._target = target
        self._names = names
        self._on_tick = on_tick
        self._on_control = on_control
        self._on_state = on_state
        self._symbols: set[str] = set()
        self._connected = False
        self._seeds: list[Address] = list(target.nodes)
        self._slots: list[tuple[int, int, Address]] = []
        # This generation: one pubsub per primary, reader tasks, and the first failure.
        self._nodes: dict[Address, PubSub] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._failed: asyncio.Future[None] | None = None
        self._leaving: set[bytes] = set()  # channels we asked to sunsubscribe
        self._symbol_of: dict[bytes, str] = {}
        self._control = names.control.encode()

    @property
    def connected(self) -> bool:
        return self._connected

    async def subscribe(self, symbols: Collection[str]) -> None:
        new = [s for s in symbols if s not in self._symbols]
        self._symbols.update(new)
        if new and self._connected:
            await self._guard(self._ssubscribe(new))

    async def unsubscribe(self, symbols: Collection[str]) -> None:
        gone = [s for s in symbols if s in self._symbols]
        self._symbols.difference_update(gone)
        if not gone or not self._connected:
            return
        for address, channels in self._by_node(gone).items():
            pubsub = self._nodes.get(address)
            if pubsub is None:
                continue
            for group in _by_slot(channels):
                self._leaving.update(c.encode() for c in group)
                await self._guard(pubsub.sunsubscribe(*group))

    async def _guard(self, call: Any) -> None:
        try:
            await call
        except (RedisError, OSError, _Lost) as exc:
            # The readers see the same failure (or are told here) and the generation starts over.
            log.warning("bus subscription change failed", extra={"error": str(exc)})
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    async def run(self) -> None:
        delay = 0.1
        while True:
            self._failed = asyncio.get_running_loop().create_future()
            try:
                await self._load_slots()
                control = self._pubsub_for(random.choice(self._primaries()))
                await control.subscribe(self._names.control)
                await self._ssubscribe(list(self._symbols))
                self._connected = True
                self._on_state(True)
                delay = 0.1
                await self._failed
            except (RedisError, OSError, _Lost) as exc:
                log.warning("bus subscriber lost", extra={"error": f"{type(exc).__name__}: {exc}",
                                                          "retry_s": delay})
            finally:
                if self._connected:
                    self._connected = False
                    self._on_state(False)
                if not self._failed.done():
                    self._failed.cancel()
                elif not self._failed.cancelled():
                    self._failed.exception()  # retrieved: the loss was logged above
                await self._teardown()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)

    async def _load_slots(self) -> None:
        """The slot map from the first seed that answers; learned primaries become seeds too."""
        errors: list[str] = []
        for host, port in random.sample(self._seeds, len(self._seeds)):
            client = self._client(host, port, timeout=2.0)
            try:
                reply = cast(list[list[Any]], await client.execute_command("CLUSTER SLOTS"))  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            finally:
                await client.aclose()
            slots = [(int(lo), int(hi), (_text(node[0]) or host, int(node[1])))
                     for lo, hi, node, *_ in reply]
            if sum(hi - lo + 1 for lo, hi, _ in slots) < 16384:
                errors.append(f"{host}:{port}: not every slot is served yet")
                continue
            self._slots = sorted(slots)
            self._seeds = list(dict.fromkeys([*self._seeds, *(a for _, _, a in slots)]))
            return
        raise _Lost("no cluster node gave a full slot map: " + "; ".join(errors))

    def _primaries(self) -> list[Address]:
        return list(dict.fromkeys(a for _, _, a in self._slots))

    def _owner(self, channel: str) -> Address:
        slot = key_slot(channel.encode())
        for lo, hi, address in self._slots:
            if lo <= slot <= hi:
                return address
        raise _Lost(f"slot {slot} is not served")

    def _by_node(self, symbols: Collection[str]) -> dict[Address, list[str]]:
        grouped: dict[Address, list[str]] = defaultdict(list)
        for symbol in symbols:
            channel = self._names.tick_channel(symbol)
            self._symbol_of[channel.encode()] = symbol
            grouped[self._owner(channel)].append(channel)
        return grouped

    async def _ssubscribe(self, symbols: list[str]) -> None:
        for address, channels in self._by_node(symbols).items():
            pubsub = self._pubsub_for(address)
            for group in _by_slot(channels):  # one SSUBSCRIBE may name channels of one slot only
                self._leaving.difference_update(c.encode() for c in group)
                await pubsub.ssubscribe(*group)

    def _pubsub_for(self, address: Address) -> PubSub:
        pubsub = self._nodes.get(address)
        if pubsub is None:
            client = self._client(*address, timeout=None)
            pubsub = self._nodes[address] = client.pubsub()
            self._readers.append(asyncio.create_task(self._read(address, pubsub)))
        return pubsub

    def _client(self, host: str, port: int, timeout: float | None) -> Redis:
        # No retries: a reconnect inside redis-py would resubscribe without telling the hub.
        return cast(Redis, connect(self._target.node_url(host, port), retries=0, socket_timeout=timeout))

    async def _read(self, address: Address, pubsub: PubSub) -> None:
        try:
            await self._read_messages(pubsub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any end of a reader ends the generation: none dies unseen
            self._fail(_Lost(f"{address[0]}:{address[1]}: {type(exc).__name__}: {exc}"))

    async def _read_messages(self, pubsub: PubSub) -> None:
        symbol_of, control = self._symbol_of, self._control
        while True:
            if not pubsub.subscribed:
                await asyncio.sleep(0.05)  # its first (s)subscribe is on its way
                continue
            msg: dict[str, Any] | None = await pubsub.get_message(timeout=5.0)
            if msg is None:
                await pubsub.check_health()  # type: ignore[no-untyped-call]
                continue
            kind = msg["type"]
            if kind == "smessage":
                symbol = symbol_of.get(msg["channel"])
                if symbol is not None:
                    self._on_tick(symbol, msg["data"])
            elif kind == "message" and msg["channel"] == control:
                self._on_control(msg["data"])
            elif kind == "sunsubscribe":
                if msg["channel"] in self._leaving:
                    self._leaving.discard(msg["channel"])
                else:
                    # Pushed by the server: the slot moved or this primary became a replica.
                    raise _Lost(f"server ended the subscription to {msg['channel']!r}")

    async def _teardown(self) -> None:
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for pubsub in self._nodes.values():
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        self._readers.clear()
        self._nodes.clear()
        self._leaving.clear()


def _by_slot(channels: list[str]) -> list[list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for channel in channels:
        groups[key_slot(channel.encode())].append(channel)
    return list(groups.values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

