"""One client connection: an asyncio protocol around websockets' sans-I/O ServerProtocol.

Bytes in go to the protocol parser in bounded slices; every frame, control frames included,
costs the client budget; commands go to the session rules; everything out goes through the
client's bounded Writer, in order. Nothing here awaits a client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN, SEND_EOF
from websockets.server import ServerProtocol

from edge import metrics
from edge.commands import Commands
from edge.handshake import endpoint_response, http_response
from edge.lag import LagProbe
from edge.messages import Assembler, InvalidUTF8
from edge.protocol import CloseCode, ErrorCode, FrameError, text_frame, tm_error
from edge.protocol import error as error_frame
from edge.ratelimit import TokenBucket
from edge.session import Session
from edge.upgrade import upgrade
from edge.writer import Writer

if TYPE_CHECKING:
    from edge.server import EdgeServer

log = logging.getLogger("fxproxy.edge")

NATIVE_PATH = "/v1/stream"
TRADERMADE_PATH = "/feedadv"
CLOSE_TIMEOUT = 2.0  # seconds a client gets to answer our close frame before we half-close
READ_SLICE = 1024  # bytes parsed per loop turn (~170 empty frames, ~1 ms): no flood holds the loop
CLOSING_PARSE = 1024  # bytes still parsed after our close frame, to find the client's answer
CLOSING_LIMIT = 65536  # bytes a closing client may still send before it is cut off
NOTSENT_LOWAT = 65536  # unsent bytes the kernel may hold for a client: backpressure shows early


class Connection(asyncio.Protocol):
    def __init__(self, server: EdgeServer, serial: int = 0) -> None:
        s = server.settings
        self.server = server
        self.serial = serial
        self.ws = ServerProtocol(max_size=s.max_frame_size)
        self.session = Session(s.max_subscriptions, s.max_strikes, TokenBucket(s.op_rate, s.op_burst))
        self.commands = Commands(self)
        self.tradermade = False
        self.upgraded = False
        self.peer_ip = "?"
        self.last_rx = 0.0
        self.lost = False
        self.transport: asyncio.Transport | None = None
        self.writer: Writer | None = None
        self._timer: asyncio.TimerHandle | None = None  # handshake or auth deadline
        self._close_timer: asyncio.TimerHandle | None = None
        self._linger_until = 0.0  # once closing: abort if the client is still there by then
        self._rx = bytearray()
        self._rx_scheduled = False
        self._rx_held = False  # an upgrade is in progress: keep what follows the request
        self._rx_eof = False
        self._rx_after_close = 0  # bytes received once our close frame was sent
        self._parsed_after_close = 0
        self._rx_bytes = 0  # bytes received before the upgrade (handshake cap)
        self._paused_for: set[str] = set()
        self._eof_sent = False
        self._close_counted = False
        self._messages = Assembler()
        self.lag = LagProbe()
        self._pending_handshake = True
        self.holds_slot = False  # one of its key's cluster-wide connection slots

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        server, s = self.server, self.server.settings
        self.transport = transport
        transport.set_write_buffer_limits(high=s.write_buffer)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            # Keep the backlog in our Writer, where it can be conflated, not in the kernel.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self.writer = Writer(transport, server.flusher, s.write_buffer, s.slow_client_timeout,
                             self._too_slow)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "?"
        loop = asyncio.get_running_loop()
        self.last_rx = loop.time()
        server.connections.add(self)
        server.pending_handshakes += 1
        metrics.HANDSHAKES_PENDING.inc()
        if server.pending_handshakes > s.max_pending_handshakes:
            metrics.HANDSHAKES_REJECTED.labels("too_many_pending").inc()
            self.abort()
            return
        self._timer = loop.call_later(s.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        if not self.upgraded and not self._rx_held:
            self._rx_bytes += len(data)
            if self._rx_bytes > self.server.settings.max_handshake_bytes:
                metrics.HANDSHAKES_REJECTED.labels("too_large").inc()
                self.abort()
                return
        if self.ws.close_sent is not None:
            self._rx_after_close += len(data)
            if self._rx_after_close > CLOSING_LIMIT:  # a closing client that keeps sending
                self.abort()
                return
        if not self._rx and not self._rx_scheduled and self.upgraded and len(data) <= READ_SLICE \
                and self.ws.close_sent is None:
            self._parse(data)  # the common case, a small read: no copies
            return
        self._rx += data
        if not self._rx_scheduled:
            self._feed()

    def eof_received(self) -> bool | None:
        self._rx_eof = True
        if not self._rx_scheduled:
            self._end_of_input()
        return True  # we close once what came before the EOF is parsed

    def _end_of_input(self) -> None:
        self.ws.receive_eof()
        self._write_protocol()
        if self.transport is not None:
            self.transport.close()  # after our queued writes are flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timers()
        self._end_handshake()
        assert self.writer is not None
        self.writer.close()
        self.server.connections.discard(self)
        self.commands.stop()
        self.commands.drop(list(self.session.symbols))
        self.server.give_back_slot(self)
        if self.upgraded:
            if not self._close_counted:
                metrics.CLOSED.labels("1006").inc()  # gone without a close frame from us
            self.server.open_count -= 1
            metrics.CONNECTIONS.dec()
            self.server.unregister(self)
            log.debug("client gone", extra={"key": self.session.key_name, "ip": self.peer_ip})

    def pause_writing(self) -> None:
        assert self.writer is not None
        self.writer.pause()
        self._pause_reading("writer")  # backpressure, not buffering: read no more from it

    def resume_writing(self) -> None:
        assert self.writer is not None
        self.writer.resume()
        self._resume_reading("writer")

    # Reading

    def _pause_reading(self, why: str) -> None:
        if not self._paused_for and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._paused_for.add(why)

    def _resume_reading(self, why: str) -> None:
        self._paused_for.discard(why)
        transport = self.transport
        if not self._paused_for and transport is not None and not self.lost and not transport.is_closing():
            transport.resume_reading()

    def _feed(self) -> None:
        """Parse at most READ_SLICE bytes, then yield the loop to other clients."""
        self._rx_scheduled = False
        if self.lost or self._rx_held:
            return
        n = READ_SLICE
        if self.ws.close_sent is not None:
            # Parse only enough to see the client's answer to our close; drop the rest unparsed.
            n = max(0, min(n, CLOSING_PARSE - self._parsed_after_close))
            if n == 0:
                self._rx.clear()
            self._parsed_after_close += n
        if not self.upgraded:
            end = self._rx.find(b"\r\n\r\n")
            n = min(n, end + 4) if end >= 0 else n
        chunk = bytes(self._rx[:n])
        del self._rx[:n]
        self._parse(chunk)
        if self._rx and not self._rx_held and not self.lost:
            self._pause_reading("slice")
            self._rx_scheduled = True
            asyncio.get_running_loop().call_soon(self._feed)
        else:
            self._resume_reading("slice")
            if self._rx_eof and not self._rx_held:
                self._end_of_input()

    def _parse(self, chunk: bytes) -> None:
        try:
            self.ws.receive_data(chunk)
        except (AssertionError, EOFError):  # bytes after the end of the conversation
            self._rx.clear()
        self._handle_events()

    def _handle_events(self) -> None:
        # Pongs made while parsing answer pings that came before anything completed in this slice.
        self._write_protocol()
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Frame):
                self._on_frame(event)
        self._write_protocol()

    def _on_frame(self, frame: Frame) -> None:
        if not self.upgraded or self.ws.state is not OPEN:
            return  # once closing, a connection only finishes the close
        loop = asyncio.get_running_loop()
        if frame.opcode is Opcode.PONG:
            self._on_pong(bytes(frame.data), loop.time())
        data_frame = frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
        if not self.session.allow_frame(loop.time()):
            # Every frame costs, control and continuation frames too; a data message that
            # is refused gets an error, the rest only a strike.
            if data_frame:
                self._messages.drop()
            if data_frame and frame.fin:
                self.refuse(FrameError(ErrorCode.RATE_LIMITED, "too many frames, slow down"))
            else:
                self._strike()
            return
        if not data_frame:
            return
        try:
            message = self._messages.feed(frame)
        except InvalidUTF8:
            self.ws.fail(1007, "invalid UTF-8 in a text frame")  # RFC 6455 8.1
            return
        if message is not None:
            self._on_message(*message)

    def _on_message(self, data: bytes, binary: bool) -> None:
        """A complete message; text has been checked to be UTF-8."""
        if binary:
            self.refuse(FrameError(ErrorCode.BAD_REQUEST, "binary frames are not supported"))
            return
        self.commands.on_text(data)

    # Writing

    def send(self, payload: bytes) -> None:
        """Queue one text message to the client."""
        assert self.writer is not None
        self.writer.send(text_frame(payload))

    def _write_protocol(self) -> None:
        """Queue what the websockets state machine wants sent (handshake, pongs, close), in order."""
        assert self.writer is not None
        for data in self.ws.data_to_send():
            if data is SEND_EOF or data == b"":
                self._half_close()
            else:
                self.writer.send(data, protocol=True)
        if self.ws.close_sent is not None and not self._close_counted:
            self._close_counted = True  # counted here, so closes made by websockets count too
            metrics.CLOSED.labels(str(self.ws.close_sent.code)).inc()
            self.writer.seal()  # once closing, nothing more goes out
        if self.ws.close_expected() and self._close_timer is None and not self.lost:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._half_close)

    def _half_close(self) -> None:
        """Send what is queued, then FIN; keep reading (discarding) until the client closes too.

        Closing with unread bytes in the kernel would send a reset and lose our close frame.
        """
        if self._eof_sent or self.lost or self.transport is None:
            return
        self._eof_sent = True
        assert self.writer is not None
        self.writer.flush(force=True)
        self._linger_until = asyncio.get_running_loop().time() + self.server.linger
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def close(self, code: int, reason: str, drop_pending: bool = False) -> None:
        """Send a close frame (after what is queued, unless dropped); the client answers or is reaped."""
        if self.lost:
            return
        self.commands.stop()
        if self.ws.state is not OPEN:
            if not self.upgraded:
                self.abort()
            return
        assert self.writer is not None
        if drop_pending:
            self.writer.drop_pending()
        self._cancel_timer()
        self.ws.send_close(code, reason)
        self._write_protocol()
        self._linger_until = asyncio.get_running_loop().time() + CLOSE_TIMEOUT + self.server.linger

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def reap(self, now: float, dead_after: float) -> None:
        """Called by keepalive: ping idle clients; abort dead ones and closes that take too long."""
        if self._linger_until and now > self._linger_until:
            self.abort()
            return
        if not self.upgraded or self.ws.state is not OPEN:
            return
        if now - self.last_rx > dead_after:
            log.info("client timed out", extra={"key": self.session.key_name, "ip": self.peer_ip})
            self.abort()
            return
        if self.lag.sent is None:
            self.ws.send_ping(b"")
            self._write_protocol()

    def probe(self, now: float, max_lag: float) -> None:
        """Measure how far behind the client reads (edge/lag.py); behind more than max_lag: lagging."""
        writer = self.writer
        if writer is None or not self.upgraded or self.ws.state is not OPEN:
            return
        if self.lag.sent is not None:
            if self.lag.overdue(now, max_lag) and not writer.lagging:
                log.info("client lagging", extra={"key": self.session.key_name, "ip": self.peer_ip})
                writer.set_lagging(True)
        elif writer.wrote or writer.lagging:
            writer.wrote = False
            self.ws.send_ping(self.lag.start(now))
            self._write_protocol()

    def _on_pong(self, data: bytes, now: float) -> None:
        lag = self.lag.answered(data, now)
        if lag is not None:
            metrics.CLIENT_LAG.observe(lag)
            assert self.writer is not None
            if self.writer.lagging:
                self.writer.set_lagging(False)

    # Refusals and timeouts

    def refuse(self, exc: FrameError) -> None:
        metrics.ERRORS.labels(exc.code.value).inc()
        self.send(tm_error(f"Error: {exc.message}") if self.tradermade
                  else error_frame(exc.code, exc.message, exc.id))
        self._strike()

    def _strike(self) -> None:
        if self.session.strike():
            self.close(CloseCode.POLICY, "too many bad or excess frames")

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.upgraded:
            metrics.HANDSHAKES_REJECTED.labels("timeout").inc()
            self.abort()

    def arm_auth_timer(self, timeout: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(timeout, self.auth_timeout)

    def auth_deadline_met(self) -> None:
        self._cancel_timer()

    def auth_timeout(self) -> None:
        self._timer = None
        if not self.session.authenticated:
            self.close(CloseCode.UNAUTHORIZED, "no valid API key within the auth timeout")

    def _too_slow(self, why: str) -> None:
        if self.ws.state is not OPEN:
            return
        log.info("closing slow client", extra={"key": self.session.key_name, "ip": self.peer_ip,
                                               "why": why})
        self.close(CloseCode.TRY_AGAIN, "too slow: reconnect", drop_pending=True)

    # HTTP

    def _end_handshake(self) -> None:
        if self._pending_handshake:
            self._pending_handshake = False
            self.server.pending_handshakes -= 1
            metrics.HANDSHAKES_PENDING.dec()

    def _on_request(self, request: Request) -> None:
        path = urlsplit(request.path).path
        if path in (NATIVE_PATH, TRADERMADE_PATH):
            self.tradermade = path == TRADERMADE_PATH
            self._rx_held = True
            self._pause_reading("upgrade")
            self.server.spawn(upgrade(self.server, self, request))
            return
        self._end_handshake()
        self._rx.clear()  # one request per connection: pipelined bytes are dropped
        self.ws.send_response(endpoint_response(path, self.server.readyz, self.server.metrics_page))

    def reject(self, status: int, reason: str, message: str) -> None:
        metrics.HANDSHAKES_REJECTED.labels(reason).inc()
        self._rx.clear()
        self.ws.send_response(http_response(status, message.encode() + b"\n"))

    def upgrade_done(self) -> None:
        """The upgrade is decided: send the answer and read on (what followed the request too)."""
        self._end_handshake()
        self._rx_held = False
        if not self.lost:
            self._write_protocol()
            self._resume_reading("upgrade")
            if (self._rx or self._rx_eof) and not self._rx_scheduled:
                self._feed()

    def accept(self, request: Request) -> bool:
        """Send the 101 (or websockets' own refusal); True when the connection is upgraded."""
        response = self.ws.accept(request)
        self.ws.send_response(response)
        if response.status_code != 101:
            metrics.HANDSHAKES_REJECTED.labels("bad_upgrade").inc()
            self._rx.clear()
            return False
        self._cancel_timer()
        self.upgraded = True
        self.server.open_count += 1
        metrics.CONNECTIONS.inc()
        if self.tradermade:
            self._write_protocol()
            self.send(b"Connected")
        return True
