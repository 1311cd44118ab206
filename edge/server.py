"""Shared state of one edge process: connections, hub, limits, readiness, and their timers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import orjson
from redis.exceptions import RedisError

from edge import metrics
from edge.auth import Authenticator, Identity
from edge.connection import Connection
from edge.demand import NOT_IN_CATALOG, REFUSALS, EdgeDemand, Refusal
from edge.handshake import parse_networks
from edge.hub import Hub
from edge.protocol import CloseCode
from edge.ratelimit import KeyedLimiter
from edge.writer import Flusher
from shared.bus import Bus
from shared.bus_probe import BusProbe
from shared.demand import DemandStore, Verdict, parse_symbol_status
from shared.metrics import render_metrics
from shared.settings import EdgeSettings

log = logging.getLogger("fxproxy.edge")


class EdgeServer:
    def __init__(self, settings: EdgeSettings, bus: Bus, auth: Authenticator,
                 demand: DemandStore | None = None, edge_id: str = "") -> None:
        self.settings = settings
        self.bus = bus
        self.auth = auth
        self.edge_id = edge_id or settings.resolved_edge_id()
        self.hub = Hub(bus.history, settings.repair_timeout, settings.replay_limit)
        self.flusher = Flusher(settings.write_delay)
        self.handshakes = KeyedLimiter(settings.handshake_rate, settings.handshake_burst)
        self.trusted = parse_networks(settings.trusted_proxies)
        self.probe = BusProbe(bus.ping, on_change=lambda _: self._update_ready())
        # A closing client gets this long to read what is queued (its close frame last).
        self.linger = 2 * settings.ping_interval
        self.connections: set[Connection] = set()  # every TCP connection, for shutdown
        self.by_key: dict[str, set[Connection]] = {}  # upgraded and authenticated
        self.open_count = 0
        self.accepted = 0  # TCP connections so far: each one's serial, so "newest" is defined
        self.pending_handshakes = 0
        self.subscribed = False
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.demand: EdgeDemand | None = None
        if demand is not None:
            self.demand = EdgeDemand(demand, self.edge_id, self.hub.symbols,
                                     3 * settings.heartbeat_interval)
            self.hub.on_symbols = self.demand.changed
        # What /readyz and /metrics answer, and who hears of readiness changes: this process
        # alone, unless a worker group (edge/workgroup.py) answers for all its workers.
        self.readyz: Callable[[], bool] = self.ready
        self.metrics_page: Callable[[], tuple[bytes, str]] = render_metrics
        self.on_ready: Callable[[bool], None] | None = None

    def ready(self) -> bool:
        return self.subscribed and self.probe.ok and not self.draining

    def _update_ready(self) -> None:
        metrics.BUS_UP.set(1 if self.subscribed and self.probe.ok else 0)
        if self.on_ready is not None:
            self.on_ready(self.ready())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def protocol_factory(self) -> Connection:
        self.accepted += 1
        return Connection(self, self.accepted)

    # The bus

    def on_bus_state(self, up: bool) -> None:
        self.subscribed = up
        self._update_ready()
        log.info("bus connected" if up else "bus disconnected")
        if up:
            # Control events sent while we were away are lost: recheck every key in use in case
            # it was revoked meanwhile, and refusals of symbols still pending.
            for key_hash in list(self.by_key):
                self.spawn(self._reload_key(key_hash))
            self.spawn(self._recheck_statuses())

    def on_bus_resubscribed(self, symbols: Collection[str]) -> None:
        """Pub/sub dropped what was published while these subscriptions were lost: replay it
        from history (only these: on a cluster, the other shards' symbols lost nothing)."""
        log.info("bus symbols resubscribed", extra={"symbols": len(symbols)})
        self.hub.recover(symbols)

    def on_bus_away(self, nodes: Collection[str]) -> None:
        """Shards whose symbols wait for them; the edge stays ready (the subscriber logs which)."""
        metrics.BUS_NODES_AWAY.set(len(nodes))

    def on_control(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            status = parse_symbol_status(event)
            key_hash = event["key"] if status is None and event.get("type") == "key_changed" else None
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            log.warning("bad control event ignored")
            return
        if status is not None:
            symbol, verdict = status
            if verdict.refused:
                self._refuse(symbol, REFUSALS[verdict.status])
        elif isinstance(key_hash, str) and key_hash in self.by_key:
            self.spawn(self._reload_key(key_hash))

    def _refuse(self, symbol: str, refusal: Refusal) -> None:
        """A symbol is refused (the leader's verdict, or gone from the catalogue): every client
        holding it, waiting for its first tick or streaming it until now, gets the error and loses
        it. Never silence."""
        refused = 0
        for conns in list(self.by_key.values()):
            for conn in list(conns):
                if symbol in conn.session.symbols:
                    conn.commands.refuse(symbol, *refusal)
                    refused += 1
        if refused:
            log.info("symbol refused to its clients", extra={"symbol": symbol, "code": refusal[0].value,
                                                            "clients": refused})

    async def _recheck_statuses(self) -> None:
        """Refusals whose fx:ctl event this edge missed (sent while the bus was away, or between a
        client's status read and its attach), and symbols the catalogue no longer allows: read
        back for every symbol this edge holds."""
        if self.demand is None:
            return
        held = list(self.hub.symbols())
        if not held:
            return
        try:
            catalog = await self.demand.store.catalog()
            verdicts: dict[str, Verdict] = await self.demand.store.statuses(held)
        except (RedisError, OSError) as exc:
            log.warning("rechecking symbol statuses failed", extra={"error": str(exc)})
            return
        for symbol in held:
            verdict = verdicts.get(symbol)
            if catalog is not None and not catalog.allows(symbol):
                self._refuse(symbol, NOT_IN_CATALOG)
            elif verdict is not None and verdict.refused:
                self._refuse(symbol, REFUSALS[verdict.status])

    async def _reload_key(self, key_hash: str) -> None:
        try:
            record = await self.auth.lookup(key_hash)
        except (RedisError, OSError) as exc:
            log.warning("key reload failed", extra={"error": str(exc)})
            return
        conns = list(self.by_key.get(key_hash, ()))
        if record is None or record.disabled:
            for conn in conns:
                conn.close(CloseCode.REVOKED, "key revoked")
            if conns:
                log.info("key revoked: connections closed",
                         extra={"key": conns[0].session.key_name, "connections": len(conns)})
            return
        for conn in conns:
            conn.commands.apply_record(record)
        if record.max_connections <= 0 or self.auth.store is None:
            return
        # A lowered limit applies to live connections too: this edge closes its share of the
        # excess, newest first (the store decides the share atomically across edges).
        try:
            excess = await self.auth.store.trim_slots(key_hash, self.edge_id, record.max_connections)
        except (RedisError, OSError) as exc:
            log.warning("connection limit trim failed", extra={"error": str(exc)})
            return
        holding = sorted((c for c in conns if c.holds_slot and not c.lost), key=lambda c: c.serial)
        for conn in holding[len(holding) - excess:] if excess > 0 else ():
            conn.holds_slot = False  # its slot was taken off by trim_slots already
            conn.close(CloseCode.CONNECTION_LIMIT, "connection limit of this key lowered")

    # Handshakes and keys

    async def take_slot(self, conn: Connection, identity: Identity) -> bool:
        """Count a connection against its key's cluster-wide limit; False when over it."""
        limit = identity.record.max_connections
        if limit > 0 and self.auth.store is not None:
            if not await self.auth.store.acquire_slot(identity.key_hash, self.edge_id, limit):
                log.info("key at its connection limit", extra={"key": identity.record.name})
                return False
            conn.holds_slot = True
        conn.session.key_hash = identity.key_hash
        if conn.lost:  # the client left while we asked: connection_lost has run already
            self.give_back_slot(conn)
        return True

    def give_back_slot(self, conn: Connection) -> None:
        if conn.holds_slot and self.auth.store is not None:
            conn.holds_slot = False
            self.spawn(self._release_slot(conn.session.key_hash))

    async def _release_slot(self, key_hash: str) -> None:
        assert self.auth.store is not None
        try:
            await self.auth.store.release_slot(key_hash, self.edge_id)
        except (RedisError, OSError) as exc:
            log.warning("slot release failed", extra={"error": str(exc)})

    def register(self, conn: Connection) -> None:
        self.by_key.setdefault(conn.session.key_hash, set()).add(conn)

    def unregister(self, conn: Connection) -> None:
        conns = self.by_key.get(conn.session.key_hash)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_key[conn.session.key_hash]

    # Timers

    async def heartbeat(self) -> None:
        """Tell the cluster this edge is alive, so the connection slots it holds count and its
        demand is streamed (and refresh that demand's TTL)."""
        store = self.auth.store
        if store is None and self.demand is None:
            return
        interval = self.settings.heartbeat_interval
        while True:
            try:
                if store is not None:
                    await store.heartbeat(self.edge_id, 3 * interval)
                if self.demand is not None:
                    await self.demand.publish()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            await self._recheck_statuses()
            await asyncio.sleep(interval)

    async def keepalive(self) -> None:
        """Ping idle clients; drop those silent for two intervals, and closes that take too long."""
        interval = min(self.settings.ping_interval, self.linger / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                conn.reap(now, 2 * self.settings.ping_interval)

    async def lag_probes(self, step: float = 0.1) -> None:
        """Probe how far behind each client reads, once per FXPROXY_MAX_LAG: a client that stops
        reading is found lagging within 2 x FXPROXY_MAX_LAG (one probe on its way, one overdue).

        Spread over the interval (each `step`, the connections of one phase), so probes and
        their answers never arrive as one burst that delays ticks.
        """
        max_lag = self.settings.max_lag
        phases = max(1, round(max_lag / step))
        loop = asyncio.get_running_loop()
        phase = 0
        while True:
            await asyncio.sleep(max_lag / phases)
            now = loop.time()
            for conn in list(self.connections):
                if conn.serial % phases == phase:
                    conn.probe(now, max_lag)
            phase = (phase + 1) % phases

    async def drain(self, timeout: float) -> None:
        """Refuse new clients, then close existing ones with 1001 spread over `timeout`."""
        self.draining = True
        self._update_ready()
        conns = [c for c in self.connections if c.upgraded]
        log.info("draining", extra={"connections": len(conns), "timeout_s": timeout})
        if conns:
            batches = max(1, min(len(conns), int(timeout * 10)))
            step = timeout / batches
            size = -(-len(conns) // batches)
            for i in range(0, len(conns), size):
                for conn in conns[i : i + size]:
                    conn.close(CloseCode.GOING_AWAY, "server draining, reconnect")
                if step:
                    await asyncio.sleep(step)
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await self.hub.close()
