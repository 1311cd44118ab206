"""The edge's I/O shell: an asyncio protocol around websockets' sans-I/O ServerProtocol.

Bytes in go to the protocol parser, commands go to the session rules, frames out go to
the client's Writer. Nothing here awaits a client: slow ones are conflated, then closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from redis.exceptions import RedisError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CONNECTING, OPEN, SEND_EOF
from websockets.server import ServerProtocol

from edge import metrics
from edge import protocol as proto
from edge.auth import Authenticator, Identity, key_from_request
from edge.handshake import client_ip, http_response, origin_allowed, parse_networks
from edge.hub import Hub
from edge.protocol import CloseCode, ErrorCode, FrameError
from edge.ratelimit import KeyedLimiter, TokenBucket
from edge.session import Session
from edge.writer import Flusher, Writer
from shared.bus import Bus
from shared.keystore import KeyRecord
from shared.metrics import render_metrics
from shared.settings import EdgeSettings
from shared.tick import mark_snapshot, seq_of, to_tradermade

log = logging.getLogger("fxproxy.edge")

NATIVE_PATH = "/v1/stream"
TRADERMADE_PATH = "/feedadv"
CLOSE_TIMEOUT = 2.0  # seconds a client gets to answer our close frame


class EdgeServer:
    """Shared state of one edge process: connections, hub, limits, readiness."""

    def __init__(self, settings: EdgeSettings, bus: Bus, auth: Authenticator) -> None:
        self.settings = settings
        self.bus = bus
        self.auth = auth
        self.edge_id = settings.resolved_edge_id()
        self.hub = Hub()
        self.flusher = Flusher(settings.write_delay)
        self.handshakes = KeyedLimiter(settings.handshake_rate, settings.handshake_burst)
        self.trusted = parse_networks(settings.trusted_proxies)
        self.connections: set[Connection] = set()  # every TCP connection, for shutdown
        self.by_key: dict[str, set[Connection]] = {}  # upgraded and authenticated
        self.open_count = 0
        self.bus_up = False
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def ready(self) -> bool:
        return self.bus_up and not self.draining

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def protocol_factory(self) -> Connection:
        return Connection(self)

    def on_bus_state(self, up: bool) -> None:
        self.bus_up = up
        metrics.BUS_UP.set(1 if up else 0)
        log.info("bus connected" if up else "bus disconnected")
        if up:
            # Pub/sub drops what is sent while we are away: replay missed ticks from
            # history, and recheck every key in use in case it was revoked meanwhile.
            self.spawn(self._recover(self.hub.hold()))
            for key_hash in list(self.by_key):
                self.spawn(self._reload_key(key_hash))

    async def _recover(self, last_seqs: dict[str, int]) -> None:
        missed: dict[str, list[bytes]] = {}
        try:
            for symbol, seq in last_seqs.items():
                missed[symbol] = await self.bus.history(symbol, seq, self.settings.replay_limit)
        except (RedisError, OSError) as exc:
            log.warning("could not replay ticks missed during the outage", extra={"error": str(exc)})
        finally:
            self.hub.release_held(missed)
        if any(missed.values()):
            log.info("replayed missed ticks", extra={"ticks": sum(map(len, missed.values()))})

    def on_control(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            key_hash = event["key"] if event.get("type") == "key_changed" else None
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            log.warning("bad control event ignored")
            return
        if isinstance(key_hash, str) and key_hash in self.by_key:
            self.spawn(self._reload_key(key_hash))

    async def _reload_key(self, key_hash: str) -> None:
        try:
            record = await self.auth.lookup(key_hash)
        except (RedisError, OSError) as exc:
            log.warning("key reload failed", extra={"error": str(exc)})
            return
        for conn in list(self.by_key.get(key_hash, ())):
            if record is None or record.disabled:
                conn.close(CloseCode.REVOKED, "key revoked")
            else:
                conn.apply_record(record)

    def register(self, conn: Connection) -> None:
        self.by_key.setdefault(conn.session.key_hash, set()).add(conn)

    def unregister(self, conn: Connection) -> None:
        conns = self.by_key.get(conn.session.key_hash)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_key[conn.session.key_hash]

    async def heartbeat(self) -> None:
        """Tell the cluster this edge is alive, so the connection slots it holds count."""
        store = self.auth.store
        if store is None:
            return
        interval = self.settings.heartbeat_interval
        while True:
            try:
                await store.heartbeat(self.edge_id, 3 * interval)
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed", extra={"error": str(exc)})
            await asyncio.sleep(interval)

    async def acquire_slot(self, identity: Identity) -> bool:
        limit = identity.record.max_connections
        if limit <= 0 or self.auth.store is None:
            return True
        return await self.auth.store.acquire_slot(identity.key_hash, self.edge_id, limit)

    async def release_slot(self, key_hash: str) -> None:
        if self.auth.store is not None:
            try:
                await self.auth.store.release_slot(key_hash, self.edge_id)
            except (RedisError, OSError) as exc:
                log.warning("slot release failed", extra={"error": str(exc)})

    async def keepalive(self) -> None:
        """Ping every open client each interval; drop those silent for two intervals."""
        interval = self.settings.ping_interval
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                conn.keepalive(now, 2 * interval)

    async def drain(self, timeout: float) -> None:
        """Refuse new clients, then close existing ones with 1001 spread over `timeout`."""
        self.draining = True
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


class Connection(asyncio.Protocol):
    def __init__(self, server: EdgeServer) -> None:
        s = server.settings
        self.server = server
        self.ws = ServerProtocol(max_size=s.max_frame_size)
        self.session = Session(s.max_subscriptions, s.max_strikes, TokenBucket(s.op_rate, s.op_burst))
        self.tradermade = False
        self.upgraded = False
        self.peer_ip = "?"
        self.last_rx = 0.0
        self._transport: asyncio.Transport | None = None
        self._writer: Writer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._inbox: deque[proto.Command | proto.Login] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._fragments: list[bytes] | None = None
        self._fragments_binary = False
        self._lost = False
        self._slot = False  # holds one of its key's cluster-wide connection slots

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        s = self.server.settings
        self._transport = transport
        transport.set_write_buffer_limits(high=s.write_buffer)
        self._writer = Writer(transport, self.server.flusher, s.slow_client_timeout, self._too_slow)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "?"
        loop = asyncio.get_running_loop()
        self.last_rx = loop.time()
        self._timer = loop.call_later(s.handshake_timeout, self._handshake_timeout)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Frame):
                self._on_frame(event)
        self._flush_protocol()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush_protocol()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timer()
        if self._worker is not None:
            self._worker.cancel()
        assert self._writer is not None
        self._writer.close()
        self.server.connections.discard(self)
        self._give_back_slot()
        if self.upgraded:
            self.server.open_count -= 1
            metrics.CONNECTIONS.dec()
            self.server.unregister(self)
            if self.session.symbols:
                symbols = list(self.session.symbols)
                self.session.symbols.clear()
                self.server.hub.detach(self._writer, symbols)
                self.server.spawn(self.server.hub.release(symbols))
            log.debug("client gone", extra={"key": self.session.key_name, "ip": self.peer_ip})

    def pause_writing(self) -> None:
        assert self._writer is not None
        self._writer.pause()

    def resume_writing(self) -> None:
        assert self._writer is not None
        self._writer.resume()

    # Plumbing

    def _flush_protocol(self) -> None:
        """Send what the websockets state machine wants sent (handshake, pongs, close)."""
        assert self._writer is not None and self._transport is not None
        for data in self.ws.data_to_send():
            if data is SEND_EOF or data == b"":
                self._writer.flush()
                self._transport.close()
            else:
                self._writer.write_now(data)
        if self.ws.close_expected() and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; the client has CLOSE_TIMEOUT to answer before we hang up."""
        if self._lost:
            return
        metrics.CLOSED.labels(str(code)).inc()
        if self.ws.state is not OPEN:
            self.abort()
            return
        self._cancel_timer()
        self.ws.send_close(code, reason)
        self._flush_protocol()

    def keepalive(self, now: float, dead_after: float) -> None:
        if not self.upgraded or self.ws.state is not OPEN:
            return
        if now - self.last_rx > dead_after:
            log.info("client timed out", extra={"key": self.session.key_name, "ip": self.peer_ip})
            self.abort()
            return
        self.ws.send_ping(b"")
        self._flush_protocol()

    def _send(self, frame: bytes) -> None:
        assert self._writer is not None
        self._writer.send(proto.text_frame(frame))

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.upgraded:
            metrics.HANDSHAKES_REJECTED.labels("timeout").inc()
            self.abort()

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.session.authenticated:
            self.close(CloseCode.UNAUTHORIZED, "no valid API key within the auth timeout")

    def _too_slow(self) -> None:
        log.info("closing slow client", extra={"key": self.session.key_name, "ip": self.peer_ip})
        # It will not read our close frame either: close() hangs up after CLOSE_TIMEOUT.
        self.close(CloseCode.TRY_AGAIN, "too slow: reconnect")

    # HTTP

    def _on_request(self, request: Request) -> None:
        path = urlsplit(request.path).path
        if path in (NATIVE_PATH, TRADERMADE_PATH):
            self.tradermade = path == TRADERMADE_PATH
            assert self._transport is not None
            self._transport.pause_reading()
            self.server.spawn(self._upgrade(request))
            return
        if path == "/healthz":
            response = http_response(200, b"ok\n")
        elif path == "/readyz":
            ok = self.server.ready()
            response = http_response(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        elif path == "/metrics":
            body, ctype = render_metrics()
            response = http_response(200, body, ctype)
        else:
            response = http_response(404, b"not found\n")
        self.ws.send_response(response)

    def _reject(self, status: int, reason: str, message: str) -> None:
        metrics.HANDSHAKES_REJECTED.labels(reason).inc()
        self.ws.send_response(http_response(status, message.encode() + b"\n"))

    async def _upgrade(self, request: Request) -> None:
        try:
            await self._handshake(request)
        except Exception:
            log.exception("handshake failed", extra={"ip": self.peer_ip})
            if self.ws.state is CONNECTING and not self._lost:
                self._reject(500, "internal", "internal error")
        finally:
            if not self._lost:
                self._flush_protocol()
                assert self._transport is not None
                if not self._transport.is_closing():
                    self._transport.resume_reading()

    async def _handshake(self, request: Request) -> None:
        server, s = self.server, self.server.settings
        loop = asyncio.get_running_loop()
        self.peer_ip = client_ip(self.peer_ip, request.headers, server.trusted)
        if not server.handshakes.take(self.peer_ip, loop.time()):
            return self._reject(429, "rate_limited", "too many handshakes from your address")
        if server.draining:
            return self._reject(503, "draining", "server draining, connect to another edge")
        if server.open_count >= s.max_connections:
            return self._reject(503, "full", "server at its connection limit, try again later")
        if not origin_allowed(request.headers.get("Origin"), s.allowed_origins):
            return self._reject(403, "origin", "origin not allowed")
        identity = None
        key = key_from_request(request.path, request.headers)
        if key is not None:
            try:
                identity = await server.auth.authenticate(key)
                admitted = identity is not None and await self._take_slot(identity)
            except (RedisError, OSError):
                return self._reject(503, "auth_unavailable", "key store unavailable, try again")
            if self._lost:
                return None
            if identity is None:
                log.info("bad API key at handshake", extra={"ip": self.peer_ip})
                return self._reject(401, "unauthorized", "invalid API key")
            if not admitted:
                return self._reject(429, "key_limit", "connection limit reached for this key")
        response = self.ws.accept(request)
        self.ws.send_response(response)
        if response.status_code != 101:
            metrics.HANDSHAKES_REJECTED.labels("bad_upgrade").inc()
            self._give_back_slot()
            return None
        self._cancel_timer()
        self.upgraded = True
        server.open_count += 1
        metrics.CONNECTIONS.inc()
        if self.tradermade:
            self._flush_protocol()
            assert self._writer is not None
            self._writer.send(proto.text_frame(b"Connected"))
        if identity is not None:
            self._authenticated(identity)
        else:
            self._timer = loop.call_later(s.auth_timeout, self._auth_timeout)
        return None

    async def _take_slot(self, identity: Identity) -> bool:
        """Count this connection against its key's cluster-wide limit; False when over it."""
        if not await self.server.acquire_slot(identity):
            log.info("key at its connection limit", extra={"key": identity.record.name})
            return False
        self.session.key_hash = identity.key_hash
        self._slot = identity.record.max_connections > 0
        if self._lost:  # the client left while we asked: connection_lost has run already
            self._give_back_slot()
        return True

    def _give_back_slot(self) -> None:
        if self._slot:
            self._slot = False
            self.server.spawn(self.server.release_slot(self.session.key_hash))

    def _authenticated(self, identity: Identity) -> None:
        self._cancel_timer()
        self.session.key_hash = identity.key_hash
        self.session.record = identity.record
        self.server.register(self)
        log.debug("client authenticated", extra={"key": identity.record.name, "ip": self.peer_ip})

    # Frames

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragments = [bytes(frame.data)]
                self._fragments_binary = frame.opcode is Opcode.BINARY
                return
            self._on_message(bytes(frame.data), frame.opcode is Opcode.BINARY)
        elif frame.opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                self._on_message(data, self._fragments_binary)

    def _on_message(self, data: bytes, binary: bool) -> None:
        if not self.upgraded or self.ws.state is not OPEN:
            return
        if not self.session.allow_frame(asyncio.get_running_loop().time()):
            self._refuse(FrameError(ErrorCode.RATE_LIMITED, "too many frames, slow down"))
            return
        if binary:
            self._refuse(FrameError(ErrorCode.BAD_REQUEST, "binary frames are not supported"))
            return
        s = self.server.settings
        try:
            cmd: proto.Command | proto.Login
            if self.tradermade:
                cmd = proto.parse_login(data, max_symbols=s.max_symbols_per_request)
            else:
                cmd = proto.parse_command(data, max_symbols=s.max_symbols_per_request)
        except FrameError as exc:
            self._refuse(exc)
            return
        if isinstance(cmd, proto.Auth) and self.session.authenticated:
            self._refuse(FrameError(ErrorCode.BAD_REQUEST, "already authenticated", cmd.id))
            return
        needs_auth = not isinstance(cmd, proto.Auth | proto.Login)
        if needs_auth and not self.session.authenticated:
            self._refuse(FrameError(
                ErrorCode.UNAUTHORIZED, 'authenticate first: {"op":"auth","key":"..."}',
                getattr(cmd, "id", None),
            ))
            return
        if isinstance(cmd, proto.Ping) and self._worker is None:
            self._send(proto.pong(cmd.id))
            return
        self._inbox.append(cmd)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def _refuse(self, exc: FrameError) -> None:
        metrics.ERRORS.labels(exc.code.value).inc()
        if self.tradermade:
            self._send(proto.tm_error(f"Error: {exc.message}"))
        else:
            self._send(proto.error(exc.code, exc.message, exc.id))
        if self.session.strike():
            self.close(CloseCode.POLICY, "too many bad or excess frames")

    async def _work(self) -> None:
        """Run queued commands in order; exists only while there is something to do."""
        try:
            while self._inbox and not self._lost:
                cmd = self._inbox.popleft()
                try:
                    await self._execute(cmd)
                except (RedisError, OSError) as exc:
                    log.warning("bus error serving a command", extra={"error": str(exc)})
                    self._send(proto.error(
                        ErrorCode.UNAVAILABLE, "temporarily unavailable, retry",
                        getattr(cmd, "id", None),
                    ))
        finally:
            self._worker = None

    async def _execute(self, cmd: proto.Command | proto.Login) -> None:
        if isinstance(cmd, proto.Ping):
            self._send(proto.pong(cmd.id))
        elif isinstance(cmd, proto.Auth):
            if self.session.authenticated:  # a second auth frame queued behind the first
                self._refuse(FrameError(ErrorCode.BAD_REQUEST, "already authenticated", cmd.id))
            else:
                await self._auth_frame(cmd.key, cmd.id)
        elif isinstance(cmd, proto.Subscribe):
            await self._subscribe(cmd.symbols, cmd.id, cmd.since)
        elif isinstance(cmd, proto.Unsubscribe):
            held = [s for s in cmd.symbols if s in self.session.symbols]
            await self._drop(held)
            self._send(proto.unsubscribed(cmd.id, held))
        else:
            await self._login(cmd)

    async def _auth_frame(self, key: str, id: proto.Id) -> bool:
        identity = await self.server.auth.authenticate(key)
        if self._lost:
            return False
        if identity is None:
            log.info("bad API key in auth frame", extra={"ip": self.peer_ip})
            if self.tradermade:
                self._send(proto.tm_error("Invalid user key"))
            self.close(CloseCode.UNAUTHORIZED, "invalid API key")
            return False
        admitted = await self._take_slot(identity)
        if self._lost:
            return False
        if not admitted:
            if self.tradermade:
                self._send(proto.tm_error("Connection limit reached for this key"))
            self.close(CloseCode.CONNECTION_LIMIT, "connection limit reached for this key")
            return False
        self._authenticated(identity)
        if not self.tradermade:
            self._send(proto.authenticated(id, identity.record.name))
        return True

    async def _login(self, login: proto.Login) -> None:
        """TraderMade: a login names the whole set of symbols wanted, so diff against it."""
        if not self.session.authenticated and not await self._auth_frame(login.key, None):
            return
        wanted = set(login.symbols)
        await self._drop([s for s in self.session.symbols if s not in wanted])
        await self._subscribe(tuple(s for s in login.symbols if s not in self.session.symbols),
                              None, {})

    async def _subscribe(self, symbols: tuple[str, ...], id: proto.Id,
                         since: dict[str, int]) -> None:
        plan = self.session.plan_subscribe(symbols)
        if plan.forbidden:
            self._symbol_error(ErrorCode.FORBIDDEN_SYMBOL, "not allowed for this key",
                               plan.forbidden, id)
        if plan.over_limit:
            self._symbol_error(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                               f"at most {self.session.max_subscriptions} per connection",
                               plan.over_limit, id)
        if not plan.allowed and not plan.already:
            return
        hub = self.server.hub
        wanted = plan.allowed
        attached: list[str] = []
        # Hold the symbols while we read, so the snapshot and the live stream meet; whatever
        # is not attached in the end (unknown, or the client left) is given back.
        await hub.acquire(wanted)
        try:
            last = await self.server.bus.last(wanted)
            replays = {s: await self.server.bus.history(s, since[s], self.server.settings.replay_limit)
                       for s in wanted if s in since}
            if self._lost:
                return
            unknown = [s for s in wanted if s not in last and hub.last(s) is None]
            if unknown:
                self._symbol_error(ErrorCode.UNKNOWN_SYMBOL, "no such symbol on this feed", unknown, id)
            attached = [s for s in wanted if s not in unknown]
            # No await from the reads above to attach(): no tick can slip in between.
            if not self.tradermade and (attached or plan.already):
                self._send(proto.subscribed(id, attached + plan.already))
            for symbol in attached:
                for payload in self._catch_up(symbol, last.get(symbol), replays.get(symbol)):
                    self._send(to_tradermade(payload) if self.tradermade else payload)
            assert self._writer is not None
            self.session.symbols.update(attached)
            hub.attach(self._writer, attached, self.tradermade)
        finally:
            unused = [s for s in wanted if s not in attached]
            if unused:
                await hub.release(unused)

    def _catch_up(self, symbol: str, stored: bytes | None, replay: list[bytes] | None) -> list[bytes]:
        """Frames a new subscriber gets before live ticks: a replay after `since`, or a snapshot."""
        seen = self.server.hub.last(symbol)
        newest = stored
        if seen is not None and (stored is None or seq_of(stored) < seen[0]):
            newest = seen[1]
        if replay is not None:
            out = list(replay)
            last_seq = seq_of(out[-1]) if out else -1
            if newest is not None and seq_of(newest) > last_seq:
                out.append(newest)
            return out
        if newest is None:
            return []
        return [newest if self.tradermade else mark_snapshot(newest)]

    def _symbol_error(self, code: ErrorCode, what: str, symbols: list[str], id: proto.Id) -> None:
        metrics.ERRORS.labels(code.value).inc()
        listed = ", ".join(symbols)
        if self.tradermade:
            self._send(proto.tm_error(f"Error: {listed}: {what}"))
        else:
            self._send(proto.error(code, f"{listed}: {what}", id, symbols))

    async def _drop(self, symbols: list[str]) -> None:
        if not symbols:
            return
        assert self._writer is not None
        self.session.symbols.difference_update(symbols)
        self.server.hub.detach(self._writer, symbols)
        await self.server.hub.release(symbols)

    def apply_record(self, record: KeyRecord) -> None:
        """A key's record changed: keep the new limits, drop symbols no longer allowed."""
        self.session.record = record
        lost = self.session.disallowed(record)
        if lost:
            if self.tradermade:
                self._send(proto.tm_error(f"Error: {', '.join(lost)}: no longer allowed for this key"))
            else:
                self._send(proto.unsubscribed(None, lost, "no longer allowed for this key"))
            self.server.spawn(self._drop(lost))

