"""The edge's reader of a Redis Cluster bus: one connection per primary that owns a subscribed
symbol (SSUBSCRIBE), the control channel (classic SUBSCRIBE) on the `{meta}` slot's primary.

Not redis-py's ClusterPubSub: it repairs subscriptions by itself (its per-node PubSubs reconnect
and resubscribe on error, and a slots-cache listener migrates channels in a background task), so a
failover would cost ticks that nobody notices. Here every loss is seen and accounted for per node:
a node is *away* when its connection fails, does not answer its PINGs (shared/pubsub_liveness.py),
a command to it fails, or it cannot be opened. Its symbols' subscriptions are lost; a fresh slot
map (CLUSTER SLOTS, partial maps taken as they are) says where they live now, they are subscribed
there, and each one's confirmation reports it resubscribed, on which the hub refills it from
history. A symbol whose slot moved (a failover, a migration, a `sunsubscribe` the server pushes)
is lost alone, the same way. The other nodes' subscriptions never wait: new symbols on live shards
are subscribed at once while a node is away.

Up/down (on_state) is the control channel's connection, on the node that serves the `{meta}`
slot (keys, limits, lease, control): an away shard that holds only symbols is reported by
on_away, not as the bus down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Collection
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.bus import AwayHandler, ControlHandler, ResubscribedHandler, StateHandler, TickHandler
from shared.cluster_ledger import Ledger
from shared.names import Names
from shared.pubsub_liveness import ANSWER_DEADLINE, PongWatch, answered
from shared.redis_url import RedisTarget, connect
from shared.slot_map import Address, SlotMap, by_slot, load_slot_map, symbol_in

log = logging.getLogger("fxproxy.bus")


@dataclass(slots=True)
class _Node:
    client: Redis
    pubsub: PubSub
    reader: asyncio.Task[None] | None = None


class ClusterSubscriber:
    def __init__(self, target: RedisTarget, names: Names, on_tick: TickHandler,
                 on_control: ControlHandler, on_state: StateHandler,
                 on_resubscribed: ResubscribedHandler | None = None,
                 on_away: AwayHandler | None = None) -> None:
        self._target = target
        self._names = names
        self._on_tick = on_tick
        self._on_control = on_control
        self._on_state = on_state
        self._on_resubscribed = on_resubscribed
        self._on_away = on_away
        self._ledger = Ledger()
        self._connected = False
        self._seeds: list[Address] = list(target.nodes)
        self._map = SlotMap()
        self._nodes: dict[Address, _Node] = {}  # open connections, one per primary we read from
        self._opening: dict[Address, asyncio.Lock] = {}
        self._probes: dict[Address, asyncio.Task[None]] = {}  # away nodes being tried again
        self._closing: set[asyncio.Task[None]] = set()
        self._away: dict[Address, float] = {}  # node -> loop time it went away
        self._control_at: Address | None = None
        self._repair = asyncio.Event()  # something waits for a fresh slot map
        self._symbol_of: dict[bytes, str] = {}
        self._control = names.control.encode()
        # Every (s)subscribe and sunsubscribe holds this: a change made between another's awaits
        # would be undone or lost. Commands to a node have a deadline, and nodes known to be away
        # get none, so it is never held for long.
        self._changing = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def away(self) -> list[str]:
        """The nodes whose subscriptions are lost and not made again yet, as host:port."""
        return sorted(f"{h}:{p}" for h, p in self._away)

    async def subscribe(self, symbols: Collection[str]) -> None:
        self._ledger.want(symbols)
        await self._sync()

    async def unsubscribe(self, symbols: Collection[str]) -> None:
        self._ledger.drop(symbols)
        await self._sync()

    # Subscriptions

    def _channel(self, symbol: str) -> str:
        return self._names.tick_channel(symbol)

    async def _sync(self) -> None:
        """Make what is subscribed match the wanted set on every node that is not away, opening
        connections to the owners it needs first (outside the lock: an open can take a while)."""
        if not self._map.spans:
            return  # run() has no slot map yet; it syncs once it has one
        while True:
            await asyncio.gather(*(self._open(a) for a in self._unopened()))
            async with self._changing:
                await self._reconcile()
            if not self._unopened():
                return

    def _owner(self, symbol: str) -> Address | None:
        return self._map.owner(self._channel(symbol))

    def _unopened(self) -> set[Address]:
        owners = {self._owner(s) for s in self._ledger.unhomed()}
        return {a for a in owners if a is not None and a not in self._nodes and a not in self._away}

    async def _reconcile(self) -> None:
        """The caller holds `_changing`. Until nothing differs: the hub may change the wanted set
        while a command is on its way."""
        while True:
            stale = self._ledger.stale()
            missing = [s for s in self._ledger.unhomed() if self._owner(s) in self._nodes]
            if not stale and not missing:
                return
            await self._leave(stale)
            await self._enter(missing)

    async def _leave(self, symbols: Collection[str]) -> None:
        by_node: dict[Address, list[str]] = defaultdict(list)
        for symbol in symbols:
            by_node[self._ledger.home[symbol]].append(symbol)
        for address, node_symbols in by_node.items():
            for group in by_slot(node_symbols, self._channel):
                node = self._nodes.get(address)
                if node is None:  # not expected: a node's homes go when its connection does
                    self._node_lost(address, RedisConnectionError("no connection to a home node"))
                    break
                channels = [self._channel(s) for s in group]
                self._ledger.leaving(group, [c.encode() for c in channels])
                if not await self._command(address, node.pubsub.sunsubscribe(*channels)):
                    break

    async def _enter(self, symbols: Collection[str]) -> None:
        by_node: dict[Address, list[str]] = defaultdict(list)
        for symbol in symbols:
            owner = self._owner(symbol)
            if owner is not None:
                by_node[owner].append(symbol)
        for address, node_symbols in by_node.items():
            # One SSUBSCRIBE may name channels of one slot only.
            for group in by_slot(node_symbols, self._channel):
                node = self._nodes.get(address)
                if node is None:
                    break
                # Before the command: its confirmation, which refills a lost symbol, must find the
                # symbol at home. If the command fails, the node's loss takes the homes back.
                # Even if the hub dropped them meanwhile: _reconcile unsubscribes them.
                self._ledger.entered(group, address)
                if not await self._command(address, node.pubsub.ssubscribe(*map(self._channel, group))):
                    break

    async def _command(self, address: Address, call: Awaitable[Any]) -> bool:
        try:
            async with asyncio.timeout(ANSWER_DEADLINE):
                await call
            return True
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            self._node_lost(address, exc)
            return False

    # Nodes

    async def _open(self, address: Address) -> None:
        """A connection to `address` that answered a PING, and its reader; or the node is away."""
        async with self._opening.setdefault(address, asyncio.Lock()):
            if address in self._nodes:
                return
            client = self._client(*address, timeout=None)
            pubsub = client.pubsub()
            try:
                await answered(pubsub)
            except (RedisError, OSError) as exc:
                self._spawn_close(_Node(client, pubsub))
                if address not in self._away:
                    self._node_lost(address, exc)
                return
            node = self._nodes[address] = _Node(client, pubsub)
            node.reader = asyncio.create_task(self._read(address, node))
            went = self._away.pop(address, None)
            if went is not None:
                log.info("bus node back", extra={
                    "node": _name(address), "away_s": round(asyncio.get_running_loop().time() - went, 2)})
                self._report_away()

    def _node_lost(self, address: Address, exc: BaseException) -> None:
        """Drop a node's connection: its symbols wait for a fresh slot map and are refilled once
        subscribed again. Synchronous, so that nothing runs between the bookkeeping steps."""
        node = self._nodes.pop(address, None)
        if node is not None:
            if node.reader is not None and node.reader is not asyncio.current_task():
                node.reader.cancel()
            self._spawn_close(node)
        lost = self._ledger.node_lost(address)
        new = address not in self._away
        if new:
            self._away[address] = asyncio.get_running_loop().time()
        if new or node is not None:
            log.warning("bus node away", extra={"node": _name(address), "symbols": len(lost),
                                                "error": f"{type(exc).__name__}: {exc}"})
        if self._control_at == address:
            self._control_at = None
            self._set_connected(False)
        if new:
            self._report_away()
        self._repair.set()

    def _probe(self, address: Address) -> None:
        """Try an away node again in the background: a hung one costs a whole deadline, and slot
        map reloads (which find its replacement) must not wait for that."""
        if address in self._probes:
            return
        task = self._probes[address] = asyncio.create_task(self._open(address))

        def done(_: asyncio.Task[None]) -> None:
            self._probes.pop(address, None)
            if address in self._nodes:
                self._repair.set()  # back: subscribe what waits for it

        task.add_done_callback(done)

    def _spawn_close(self, node: _Node) -> None:
        task = asyncio.create_task(_close_quietly(node))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _set_connected(self, up: bool) -> None:
        if up != self._connected:
            self._connected = up
            self._on_state(up)

    def _report_away(self) -> None:
        if self._on_away is not None:
            self._on_away(self.away)

    # The repair loop

    async def run(self) -> None:
        delay = 0.1
        try:
            while True:
                self._repair.clear()
                try:
                    await self._repair_once()
                except (RedisError, OSError) as exc:
                    log.warning("bus subscriber repair failed", extra={
                        "error": f"{type(exc).__name__}: {exc}", "retry_s": delay})
                if self._whole():
                    delay = 0.1
                    await self._repair.wait()
                    continue
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                # A short cap: one CLUSTER SLOTS an attempt, and what waits is only the away
                # node's symbols (or, for the {meta} node, readiness).
                delay = min(delay * 2, 0.5)
        finally:
            self._set_connected(False)
            for task in list(self._probes.values()):
                task.cancel()
            nodes = list(self._nodes.values())
            self._nodes.clear()
            for node in nodes:
                if node.reader is not None:
                    node.reader.cancel()
                await _close_quietly(node)
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)

    def _whole(self) -> bool:
        return self._control_at is not None and self._ledger.whole()

    async def _repair_once(self) -> None:
        """A fresh slot map; then the control channel and every symbol where they live now."""
        self._map = await load_slot_map(self._query_slots, self._map, self._seeds, self._away)
        self._seeds = list(dict.fromkeys([*self._seeds, *self._map.primaries()]))
        moved = self._ledger.moved(self._owner)
        if moved:
            log.warning("bus subscriptions moved", extra={"symbols": len(moved)})
        owners = {self._owner(s) for s in self._ledger.unhomed()}
        meta = self._map.owner(self._names.control)
        if self._control_at is None:
            owners.add(meta)
        needed = {a for a in owners if a is not None}
        for address in [a for a in self._away if a not in needed]:
            # Out of the map, or nothing of ours lives there any more: nothing waits for it.
            del self._away[address]
            log.info("bus node no longer needed", extra={"node": _name(address)})
            self._report_away()
        for address in needed:
            if address in self._away:
                self._probe(address)
        if self._control_at is None and meta is not None and meta not in self._away:
            await self._open(meta)
            async with self._changing:
                node = self._nodes.get(meta)
                if node is not None and self._control_at is None and \
                        await self._command(meta, node.pubsub.subscribe(self._names.control)):
                    self._control_at = meta
                    self._set_connected(True)
        await self._sync()
        self._close_idle()

    def _close_idle(self) -> None:
        """Close connections to nodes that are no primary any more (a failover's old primary)
        and hold nothing of ours; an idle primary's stays open for the next symbol there."""
        primaries = set(self._map.primaries())
        busy = self._ledger.busy()
        for address in [a for a in self._nodes if a not in primaries and a not in busy
                        and a != self._control_at]:
            node = self._nodes.pop(address)
            if node.reader is not None:
                node.reader.cancel()
            self._spawn_close(node)
            log.info("bus connection closed: no longer a primary", extra={"node": _name(address)})

    async def _query_slots(self, address: Address) -> list[list[Any]]:
        client = self._client(*address, timeout=ANSWER_DEADLINE)
        try:
            return cast(list[list[Any]], await client.execute_command("CLUSTER SLOTS"))  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    def _client(self, host: str, port: int, timeout: float | None) -> Redis:
        # No retries: a reconnect inside redis-py would resubscribe without telling the hub.
        return cast(Redis, connect(self._target.node_url(host, port), retries=0, socket_timeout=timeout,
                                   connect_timeout=ANSWER_DEADLINE))

    # Reading

    async def _read(self, address: Address, node: _Node) -> None:
        try:
            await self._read_messages(address, node)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any end of a reader is a loss: none dies unseen
            if self._nodes.get(address) is node:
                self._node_lost(address, exc)

    async def _read_messages(self, address: Address, node: _Node) -> None:
        control, watch = self._control, PongWatch(node.pubsub)
        while True:
            msg = await watch.next_message()
            kind = msg["type"]
            if kind == "smessage":
                self._on_tick(self._symbol(msg["channel"]), msg["data"])
            elif kind == "message" and msg["channel"] == control:
                self._on_control(msg["data"])
            elif kind == "ssubscribe":
                self._confirmed(address, msg["channel"])
            elif kind == "sunsubscribe":
                self._ended(address, msg["channel"])

    def _confirmed(self, address: Address, channel: bytes) -> None:
        """A subscription is in place: if it was lost before, history may hold what it missed."""
        symbol = self._symbol(channel)
        if self._ledger.confirmed(address, symbol) and self._on_resubscribed is not None:
            self._on_resubscribed([symbol])

    def _ended(self, address: Address, channel: bytes) -> None:
        if self._ledger.ended(address, channel, self._symbol(channel)):
            # Pushed by the server: the slot moved or this primary became a replica.
            log.warning("bus subscription ended by the server", extra={
                "node": _name(address), "channel": channel.decode()})
            self._repair.set()

    def _symbol(self, channel: bytes) -> str:
        symbol = self._symbol_of.get(channel)
        if symbol is None:
            symbol = self._symbol_of[channel] = symbol_in(channel)
        return symbol


async def _close_quietly(node: _Node) -> None:
    with contextlib.suppress(RedisError, OSError):
        async with asyncio.timeout(ANSWER_DEADLINE):
            await node.pubsub.aclose()
            await node.client.aclose()




def _name(address: Address) -> str:
    return f"{address[0]}:{address[1]}"
