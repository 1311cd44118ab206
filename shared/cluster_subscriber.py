"""The edge's reader of a Redis Cluster bus: one SSUBSCRIBE connection per primary that owns a
subscribed symbol, plus one classic SUBSCRIBE for the control channel (a cluster forwards classic
PUBLISH to every node, so any node will do).

Not redis-py's ClusterPubSub: it repairs subscriptions by itself (its per-node PubSubs reconnect
and resubscribe on error, and a slots-cache listener migrates channels in a background task), so a
failover would cost ticks that nobody notices. Here a loss is always reported: when a node's
connection fails, a reply is MOVED, or the server pushes `sunsubscribe` (the slot moved, or its
primary became a replica), on_state(False); then a fresh slot map from CLUSTER SLOTS, the lost
symbols subscribed again where they live now, and on_state(True), on which the hub refills every
symbol from history. Only the lost node's (or channel's) symbols are re-made: the other nodes'
connections keep delivering meanwhile.
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

_TIMEOUT = 2.0  # seconds to connect to a node, and for a CLUSTER SLOTS reply


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
        self._nodes: dict[Address, PubSub] = {}  # one connection per primary we read from
        self._readers: dict[Address, asyncio.Task[None]] = {}
        self._home: dict[str, Address] = {}  # symbol -> the node it is subscribed on
        self._control_at: Address | None = None
        self._broken: set[Address] = set()  # nodes whose connection failed
        self._lost = asyncio.Event()  # something must be re-made
        self._leaving: set[bytes] = set()  # channels we asked to sunsubscribe
        self._symbol_of: dict[bytes, str] = {}
        self._control = names.control.encode()
        # Every (s)subscribe, sunsubscribe and connection drop holds this: redis-py's PubSub
        # is not safe for two commands at once (two first commands open two connections), and
        # a change made between another's awaits would be undone or lost.
        self._changing = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._connected

    async def subscribe(self, symbols: Collection[str]) -> None:
        self._symbols.update(symbols)
        async with self._changing:
            if self._connected:  # else the next repair subscribes them
                await self._sync(home=True)

    async def unsubscribe(self, symbols: Collection[str]) -> None:
        self._symbols.difference_update(symbols)
        async with self._changing:
            await self._sync(home=self._connected)

    async def _sync(self, home: bool) -> None:
        """Make what is subscribed match the wanted set; the caller holds `_changing`. Until
        nothing differs: the hub may change the wanted set while a command is on its way."""
        while not self._lost.is_set():
            stale = [s for s in self._home if s not in self._symbols]
            missing = [s for s in self._symbols if s not in self._home] if home else []
            if not stale and not missing:
                return
            await self._leave(stale)
            await self._home_symbols(missing)

    async def _leave(self, symbols: Collection[str]) -> None:
        by_node: dict[Address, list[str]] = defaultdict(list)
        for symbol in symbols:
            address = self._home.pop(symbol, None)
            if address is not None:
                by_node[address].append(self._names.tick_channel(symbol))
        for address, channels in by_node.items():
            for group in _by_slot(channels):
                pubsub = self._nodes.get(address)
                if pubsub is None:
                    break  # its connection was dropped, and its subscriptions with it
                self._leaving.update(c.encode() for c in group)
                if not await self._guard(address, pubsub.sunsubscribe(*group)):
                    break

    async def _home_symbols(self, symbols: Collection[str]) -> None:
        """Subscribe each symbol on the node that owns it now, as far as the slot map knows."""
        by_node: dict[Address, list[str]] = defaultdict(list)
        for symbol in symbols:
            try:
                by_node[self._owner(self._names.tick_channel(symbol))].append(symbol)
            except _Lost as exc:
                log.warning("bus subscription deferred", extra={"error": str(exc)})
                self._lost.set()
        for address, group_symbols in by_node.items():
            pubsub = self._pubsub_for(address)
            channels = [self._names.tick_channel(s) for s in group_symbols]
            for group in _by_slot(channels):  # one SSUBSCRIBE may name channels of one slot only
                self._leaving.difference_update(c.encode() for c in group)
                if not await self._guard(address, pubsub.ssubscribe(*group)):
                    return
            for symbol in group_symbols:
                # Even if the hub dropped it meanwhile: it is subscribed, and _sync unsubscribes it.
                self._home[symbol] = address

    async def _guard(self, address: Address, call: Any) -> bool:
        try:
            await call
            return True
        except (RedisError, OSError) as exc:
            log.warning("bus subscription change failed", extra={
                "node": f"{address[0]}:{address[1]}", "error": f"{type(exc).__name__}: {exc}"})
            self._broken.add(address)
            self._lost.set()
            return False

    async def run(self) -> None:
        delay = 0.1
        try:
            while True:
                try:
                    async with self._changing:
                        await self._repair()
                        if not self._lost.is_set() and not self._connected:
                            # Under the lock: a subscribe waiting for it then sees connected.
                            self._connected = True
                            self._on_state(True)
                    if not self._lost.is_set():
                        delay = 0.1
                        await self._lost.wait()
                except (RedisError, OSError, _Lost) as exc:
                    log.warning("bus subscriber lost", extra={"error": f"{type(exc).__name__}: {exc}",
                                                              "retry_s": delay})
                if self._connected:
                    self._connected = False
                    self._on_state(False)
                self._lost.clear()
                async with self._changing:
                    await self._drop_broken()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                # A short cap: one CLUSTER SLOTS an attempt, and the lost node's symbols are what
                # waits for it while the other nodes deliver.
                delay = min(delay * 2, 0.5)
        finally:
            async with self._changing:
                self._broken.update(self._nodes)
                await self._drop_broken()

    async def _repair(self) -> None:
        """A fresh slot map; the control channel and every symbol not subscribed where it lives.
        The caller holds `_changing`."""
        await self._load_slots()
        for symbol, home in list(self._home.items()):
            if self._owner(self._names.tick_channel(symbol)) != home:
                del self._home[symbol]  # its slot lives elsewhere now (moved, or a failover)
        if self._control_at is None:
            address = random.choice(self._primaries())
            if await self._guard(address, self._pubsub_for(address).subscribe(self._names.control)):
                self._control_at = address
        await self._sync(home=True)

    async def _drop_broken(self) -> None:
        for address in list(self._broken):
            task = self._readers.pop(address, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            pubsub = self._nodes.pop(address, None)
            if pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            for symbol in [s for s, home in self._home.items() if home == address]:
                del self._home[symbol]
            if self._control_at == address:
                self._control_at = None
        self._broken.clear()

    async def _load_slots(self) -> None:
        """The slot map from the first seed that answers; learned primaries become seeds too."""
        errors: list[str] = []
        # The last map's primaries first: after a failover the configured seeds may be the
        # ones that are away, and each costs up to a connect timeout.
        primaries = self._primaries()
        others = [a for a in self._seeds if a not in primaries]
        for host, port in [*random.sample(primaries, len(primaries)),
                           *random.sample(others, len(others))]:
            client = self._client(host, port, timeout=_TIMEOUT)
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

    def _pubsub_for(self, address: Address) -> PubSub:
        pubsub = self._nodes.get(address)
        if pubsub is None:
            client = self._client(*address, timeout=None)
            pubsub = self._nodes[address] = client.pubsub()
            self._readers[address] = asyncio.create_task(self._read(address, pubsub))
        return pubsub

    def _client(self, host: str, port: int, timeout: float | None) -> Redis:
        # No retries: a reconnect inside redis-py would resubscribe without telling the hub.
        return cast(Redis, connect(self._target.node_url(host, port), retries=0, socket_timeout=timeout,
                                   connect_timeout=_TIMEOUT))

    async def _read(self, address: Address, pubsub: PubSub) -> None:
        try:
            await self._read_messages(pubsub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any end of a reader is a loss: none dies unseen
            log.warning("bus node lost", extra={"node": f"{address[0]}:{address[1]}",
                                                "error": f"{type(exc).__name__}: {exc}"})
            self._broken.add(address)
            self._lost.set()

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
                if symbol is None:
                    symbol = symbol_of[msg["channel"]] = _symbol_in(msg["channel"])
                self._on_tick(symbol, msg["data"])
            elif kind == "message" and msg["channel"] == control:
                self._on_control(msg["data"])
            elif kind == "sunsubscribe":
                channel: bytes = msg["channel"]
                if channel in self._leaving:
                    self._leaving.discard(channel)
                    continue
                # Pushed by the server: the slot moved or this primary became a replica.
                log.warning("bus subscription ended by the server", extra={"channel": channel.decode()})
                self._home.pop(_symbol_in(channel), None)
                self._lost.set()


def _by_slot(channels: list[str]) -> list[list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for channel in channels:
        groups[key_slot(channel.encode())].append(channel)
    return list(groups.values())


def _symbol_in(channel: bytes) -> str:
    """The symbol inside a sharded tick channel's hash tag: `fx:{EURUSD}:tick` -> EURUSD."""
    return channel.partition(b"{")[2].rpartition(b"}")[0].decode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

