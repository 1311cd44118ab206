"""What one connection's commands do: auth, subscribe (with catch-up), unsubscribe, login, ping.

Commands run one at a time, in order, in a task that exists only while there is work. Hub
reference counts change without an await in between, inside try/finally, so a client that
leaves at any await point gives back exactly what it took.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from websockets.protocol import OPEN

from edge import metrics
from edge import protocol as proto
from edge.catchup import CatchUp, catch_up, replay_size
from edge.demand import PENDING, SERVE, Judgement, judge
from edge.protocol import CloseCode, ErrorCode, FrameError
from shared.keystore import KeyRecord, hash_key
from shared.tick import Position, to_tradermade

if TYPE_CHECKING:
    from edge.auth import Identity
    from edge.connection import Connection

log = logging.getLogger("fxproxy.edge")
HISTORY_READS = 3  # a replay chases an advancing stream at most this often before giving up


class Commands:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._inbox: deque[proto.Command | proto.Login] = deque()
        self._worker: asyncio.Task[None] | None = None

    @property
    def _live(self) -> bool:
        return not self.conn.lost and self.conn.ws.state is OPEN

    def stop(self) -> None:
        """The connection is closing: queued commands never run."""
        self._inbox.clear()
        if self._worker is not None and self.conn.lost:
            self._worker.cancel()

    def on_text(self, data: bytes) -> None:
        conn, session = self.conn, self.conn.session
        limit = conn.server.settings.max_symbols_per_request
        try:
            cmd: proto.Command | proto.Login
            if conn.tradermade:
                cmd = proto.parse_login(data, max_symbols=limit)
            else:
                cmd = proto.parse_command(data, max_symbols=limit)
        except FrameError as exc:
            conn.refuse(exc)
            return
        if isinstance(cmd, proto.Auth) and session.authenticated:
            conn.refuse(FrameError(ErrorCode.BAD_REQUEST, "already authenticated", cmd.id))
            return
        if not isinstance(cmd, proto.Auth | proto.Login) and not session.authenticated:
            conn.refuse(FrameError(
                ErrorCode.UNAUTHORIZED, 'authenticate first: {"op":"auth","key":"..."}',
                getattr(cmd, "id", None),
            ))
            return
        if isinstance(cmd, proto.Ping) and self._worker is None:
            conn.send(proto.pong(cmd.id))
            return
        self._inbox.append(cmd)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self._inbox and self._live:
                cmd = self._inbox.popleft()
                try:
                    await self._execute(cmd)
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning("bus error serving a command", extra={"error": str(exc)})
                    if self._live:
                        self.conn.send(proto.error(ErrorCode.UNAVAILABLE, "temporarily unavailable, retry",
                                                   getattr(cmd, "id", None)))
        finally:
            self._worker = None

    async def _execute(self, cmd: proto.Command | proto.Login) -> None:
        if isinstance(cmd, proto.Ping):
            self.conn.send(proto.pong(cmd.id))
        elif isinstance(cmd, proto.Auth):
            if self.conn.session.authenticated:  # a second auth frame queued behind the first
                self.conn.refuse(FrameError(ErrorCode.BAD_REQUEST, "already authenticated", cmd.id))
            else:
                await self._auth_frame(cmd.key, cmd.id)
        elif isinstance(cmd, proto.Subscribe):
            await self._subscribe(cmd.symbols, cmd.id, cmd.since, cmd.max_rate)
        elif isinstance(cmd, proto.Unsubscribe):
            held = [s for s in cmd.symbols if s in self.conn.session.symbols]
            self.drop(held)
            self.conn.send(proto.unsubscribed(cmd.id, held))
        else:
            await self._login(cmd)

    # Authentication

    async def _auth_frame(self, key: str, id: proto.Id) -> bool:
        conn = self.conn
        identity = await conn.server.auth.authenticate(key)
        if not self._live:
            return False
        if identity is None:
            log.info("bad API key in auth frame", extra={"ip": conn.peer_ip})
            if conn.tradermade:
                conn.send(proto.tm_error("Invalid user key"))
            conn.close(CloseCode.UNAUTHORIZED, "invalid API key")
            return False
        admitted = await conn.server.take_slot(conn, identity)
        if not self._live:
            return False
        if not admitted:
            if conn.tradermade:
                conn.send(proto.tm_error("Connection limit reached for this key"))
            conn.close(CloseCode.CONNECTION_LIMIT, "connection limit reached for this key")
            return False
        self.authenticated(identity)
        if not conn.tradermade:
            conn.send(proto.authenticated(id, identity.record.name))
        return True

    def authenticated(self, identity: Identity) -> None:
        conn = self.conn
        conn.auth_deadline_met()
        conn.session.key_hash = identity.key_hash
        conn.session.record = identity.record
        conn.server.register(conn)
        log.debug("client authenticated", extra={"key": identity.record.name, "ip": conn.peer_ip})

    async def _login(self, login: proto.Login) -> None:
        """TraderMade: a login names the whole set of symbols wanted, so diff against it."""
        session = self.conn.session
        if session.authenticated:
            if not hmac.compare_digest(hash_key(login.key), session.key_hash):
                # One connection, one key: never stream under a key the client did not prove.
                self.conn.refuse(FrameError(ErrorCode.BAD_REQUEST,
                                            "already logged in with another userKey; reconnect to change it"))
                return
        elif not await self._auth_frame(login.key, None):
            return
        wanted = set(login.symbols)
        self.drop([s for s in session.symbols if s not in wanted])
        await self._subscribe(tuple(s for s in login.symbols if s not in session.symbols), None, {}, None)

    # Subscriptions

    async def _subscribe(self, symbols: tuple[str, ...], id: proto.Id,
                         since: dict[str, proto.Since], asked_rate: float | None) -> None:
        conn = self.conn
        rate = conn.session.granted_rate(asked_rate)
        plan = conn.session.plan_subscribe(symbols)
        if plan.forbidden:
            self._symbol_error(ErrorCode.FORBIDDEN_SYMBOL, "not allowed for this key", plan.forbidden, id)
        if plan.over_limit:
            self._symbol_error(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                               f"at most {conn.session.max_subscriptions} per connection",
                               plan.over_limit, id)
        if not plan.allowed and not plan.already:
            return
        hub, wanted = conn.server.hub, plan.allowed
        attached: list[str] = []
        hub.acquire(wanted)  # no await between this and the try: nothing can leak
        try:
            plans = await self._catch_up(wanted, since)
            verdicts = await self._judge({s: p.position if (p := plans[s]) else None for s in wanted})
            if not self._live:
                return
            # No await from here to attach(): no tick can slip in between. A symbol served that
            # had no tick may have got its first one while we asked: the hub (subscribed) holds it.
            refused: dict[tuple[ErrorCode, str], list[str]] = {}
            for symbol in wanted:
                verdict = verdicts[symbol]
                if isinstance(verdict, tuple):
                    refused.setdefault(verdict, []).append(symbol)
                elif verdict == PENDING:
                    plans[symbol] = None  # nothing stored is current: the next tick is its first
                else:
                    plans[symbol] = self._replan(symbol, since.get(symbol), plans[symbol])
            for (code, what), refused_symbols in refused.items():
                self._symbol_error(code, what, refused_symbols, id)
            attached = [s for s in wanted if verdicts[s] in (SERVE, PENDING)]
            pending = [s for s in attached if plans[s] is None]
            if not conn.tradermade and (attached or plan.already):
                recovered = {s: p.recovered for s in attached
                             if (p := plans[s]) is not None and p.recovered is not None}
                # A resume of a pending symbol cannot be exact: say so, like any refused resume.
                recovered.update({s: False for s in pending if s in since})
                rates = {s: rate for s in attached} if rate is not None else None
                conn.send(proto.subscribed(id, attached + plan.already, recovered, rates, pending))
            assert conn.writer is not None
            for symbol in attached:
                catchup = plans[symbol]
                if catchup is None:  # pending: its first tick is the first it gets
                    hub.attach_pending(conn.writer, symbol, conn.tradermade, rate)
                elif conn.tradermade:
                    conn.send(to_tradermade(catchup.payload))
                    hub.attach(conn.writer, symbol, catchup.position, catchup.payload, True, rate)
                else:
                    for payload in catchup.frames:
                        conn.send(payload)
                    hub.attach(conn.writer, symbol, catchup.position, catchup.payload, False, rate)
                conn.session.asked_rate[symbol] = asked_rate
            conn.session.symbols.update(attached)
        finally:
            hub.release([s for s in wanted if s not in attached])

    async def _catch_up(self, wanted: list[str], since: dict[str, proto.Since]) -> dict[str, CatchUp | None]:
        """Read Redis, then plan each symbol against the hub as it is now (see edge/catchup.py).

        History is read only for replays that can be given, and only as much as each needs:
        what a replay may cost comes out of the client's buffer budget, across all its symbols.
        """
        server, writer = self.conn.server, self.conn.writer
        assert writer is not None
        hub, bus, limit = server.hub, server.bus, server.settings.replay_limit
        await hub.synced()  # subscribed before reading, so the snapshot and the stream meet
        stored = await bus.last(wanted)
        history: dict[str, list[bytes]] = {}
        for _ in range(HISTORY_READS):
            room = writer.room() // 2
            for s, at in since.items():
                n = replay_size(at, hub.last(s), stored.get(s), limit)
                size = n * len(stored.get(s) or b"")
                if n and size <= room and len(history.get(s, ())) < n:
                    history[s] = await bus.history(s, at.seq, n)
                    room -= size
            plans: dict[str, CatchUp | None] = {}
            room = writer.room() // 2
            for s in wanted:
                found = history.get(s)
                if found is not None:  # the stream may have moved on while we read: the hub has it
                    found = found + hub.recent(s)
                plan = plans[s] = catch_up(since.get(s), hub.last(s), stored.get(s), found, limit, room)
                room -= sum(map(len, plan.frames)) if plan is not None else 0
            # The stream moved on while we read: read the rest, a bounded number of times.
            if not any(p is not None and p.short for p in plans.values()) or not self._live:
                break
        return plans

    async def _judge(self, symbols: dict[str, Position | None]) -> dict[str, Judgement]:
        """Each symbol (with the newest position found) served, pending, or refused and why (see
        edge/demand.py). Without a demand store, only what has ticked is served."""
        demand = self.conn.server.demand
        if demand is None:
            return judge(symbols, None, {})
        return await demand.judge(symbols)

    def _replan(self, symbol: str, since: proto.Since | None, plan: CatchUp | None) -> CatchUp | None:
        """The plan brought up to the hub as it is now (no await): it may have moved on while we
        read and asked, and those ticks went to the clients it had, not to this one. What the
        plan replayed, and the hub's recent ticks, extend it; else the newer snapshot."""
        hub, writer = self.conn.server.hub, self.conn.writer
        assert writer is not None
        live = hub.last(symbol)
        if plan is not None and (live is None or (live[0].epoch == plan.position.epoch
                                                  and live[0].seq <= plan.position.seq)):
            return plan  # the hub is not past it (a gate holds the client until it is)
        found = (plan.frames if plan is not None and plan.recovered else []) + hub.recent(symbol)
        return catch_up(since, live, None, found, self.conn.server.settings.replay_limit, writer.room() // 2)

    def refuse(self, symbol: str, code: ErrorCode, what: str) -> None:
        """The leader refused a symbol this client holds (waiting for it, or streaming it until
        now): say so and drop it, never leave it silent."""
        self._symbol_error(code, what, [symbol], None)
        self.drop([symbol])

    def _symbol_error(self, code: ErrorCode, what: str, symbols: list[str], id: proto.Id) -> None:
        metrics.ERRORS.labels(code.value).inc()
        listed = ", ".join(symbols)
        if self.conn.tradermade:
            self.conn.send(proto.tm_error(f"Error: {listed}: {what}"))
        else:
            self.conn.send(proto.error(code, f"{listed}: {what}", id, symbols))

    def drop(self, symbols: list[str]) -> None:
        if not symbols:
            return
        conn = self.conn
        assert conn.writer is not None
        conn.session.symbols.difference_update(symbols)
        for symbol in symbols:
            conn.session.asked_rate.pop(symbol, None)
        conn.server.hub.detach(conn.writer, symbols)
        conn.server.hub.release(symbols)

    def apply_record(self, record: KeyRecord) -> None:
        """A key's record changed: keep the new limits, drop symbols no longer allowed."""
        conn = self.conn
        conn.session.record = record
        if conn.writer is not None:  # the key's max_rate may have changed: grant again
            for symbol, asked in conn.session.asked_rate.items():
                conn.server.hub.set_rate(conn.writer, symbol, conn.tradermade,
                                         conn.session.granted_rate(asked))
        lost = conn.session.disallowed(record)
        if lost:
            if conn.tradermade:
                conn.send(proto.tm_error(f"Error: {', '.join(lost)}: no longer allowed for this key"))
            else:
                conn.send(proto.unsubscribed(None, lost, "no longer allowed for this key"))
            self.drop(lost)
