"""A client that stops reading costs the others nothing, and is closed with 1013."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import orjson

from tests.component.conftest import STATIC_KEY, StartEdge
from tests.support.client import live_ticks, open_native, recv_json, send_json


def stalled_client(port: int, symbols: list[str]) -> socket.socket:
    """Handshake and subscribe over a raw socket with a tiny receive buffer, then never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {STATIC_KEY}\r\n\r\n".encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    payload = orjson.dumps({"op": "subscribe", "symbols": symbols})
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes((0x81, 0x80 | len(payload))) + mask + masked)
    return sock


def _conn_of(server: object, ws: object) -> object:
    """The server-side connection of a client, matched by the client's local port."""
    port = ws.local_address[1]  # type: ignore[attr-defined]
    return next(c for c in server.connections  # type: ignore[attr-defined]
                if c.transport.get_extra_info("peername")[1] == port)


async def test_stalled_client_is_conflated_then_closed_while_others_get_every_tick(
    start_edge: StartEdge,
) -> None:
    edge = await start_edge(write_buffer=4096, slow_client_timeout=0.5)
    server = edge.app.server
    stalled = await asyncio.to_thread(stalled_client, edge.port, ["EURUSD", "GBPUSD"])
    async with await open_native(edge.port, STATIC_KEY, max_queue=None) as good:
        await send_json(good, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"]})
        for _ in range(3):
            await recv_json(good)
        assert server.open_count == 2
        # Publish until the stalled client's buffers are full (kernel buffers autotune to
        # several MB on loopback), reading the good client as we go; bounded either way.
        stalled_conn = next(c for c in server.connections if c is not _conn_of(server, good))
        ticks: list[dict[str, object]] = []
        rounds = 0
        while rounds < 400 and not stalled_conn.writer.paused:  # type: ignore[union-attr]
            rounds += 1
            await edge.tick("EURUSD", 50)
            await edge.tick("GBPUSD", 50)
            ticks += await live_ticks(good, 100, timeout=10)
        assert stalled_conn.writer.paused, "the stalled client never fell behind"  # type: ignore[union-attr]
        await edge.tick("EURUSD", 50)  # more ticks while it is paused: these are conflated
        await edge.tick("GBPUSD", 50)
        ticks += await live_ticks(good, 100, timeout=10)
        for symbol in ("EURUSD", "GBPUSD"):
            seqs = [t["seq"] for t in ticks if t["symbol"] == symbol]
            assert seqs == list(range(2, 2 + 50 * (rounds + 1))), f"{symbol} lost or reordered ticks"
        # The stalled client is sent a 1013 close after its timeout; it may read it later.
        for _ in range(100):
            if stalled_conn.ws.close_sent is not None:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert stalled_conn.ws.close_sent.code == 1013, "the stalled client was never closed"  # type: ignore[attr-defined]
    stalled.close()
    from edge import metrics

    assert metrics.CLOSED.labels("1013")._value.get() >= 1
    assert metrics.CONFLATED._value.get() > 0
