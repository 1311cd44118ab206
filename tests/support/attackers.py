"""Hostile clients written by hand over raw sockets: upgrade requests, masked frames, floods.

Everything here is blocking socket code meant to run in a thread (`asyncio.to_thread`), and every
loop is bounded in bytes and in seconds. Nothing here knows fxproxy's internals: it speaks
HTTP/1.1 and RFC 6455 the way a hostile client would.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import os
import select
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

__all__ = [
    "OP_CLOSE", "OP_CONT", "OP_PING", "OP_PONG", "OP_TEXT",
    "FloodReport", "FloodResult", "FrameReader", "RawClient", "Received", "connect_ws", "drain",
    "flood", "flood_process", "http_get", "masked_frame", "partial_upgrade", "rst_close", "text",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def masked_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One client-to-server frame, masked as RFC 6455 requires of clients."""
    head = bytes(((0x80 if fin else 0) | opcode,))
    n = len(payload)
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 1 << 16:
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(obj: object) -> bytes:
    """A masked text frame holding `obj` as JSON."""
    return masked_frame(OP_TEXT, orjson.dumps(obj))


def upgrade_request(path: str, key: str | None, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13",
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{name}: {value}" for name, value in headers or ()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Received:
    """What the server sent, as seen by a client that parses frames itself."""

    frames: list[tuple[int, bytes, float]] = field(default_factory=list)  # opcode, payload, time
    close_code: int | None = None
    close_at: float | None = None  # time.monotonic() the close frame arrived
    eof_at: float | None = None  # time.monotonic() the TCP stream ended (FIN or RST)
    reset: bool = False

    def texts(self) -> list[tuple[bytes, float]]:
        return [(payload, at) for op, payload, at in self.frames if op == OP_TEXT]


class FrameReader:
    """Parse server-to-client (unmasked) frames from a byte stream, incrementally."""

    def __init__(self, into: Received) -> None:
        self.into = into
        self._buf = bytearray()

    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        while True:
            buf = self._buf
            if len(buf) < 2:
                return
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at:at + n])
            del buf[:at + n]
            self.into.frames.append((opcode, payload, now))
            if opcode == OP_CLOSE and self.into.close_at is None:
                self.into.close_at = now
                self.into.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


@dataclass
class RawClient:
    sock: socket.socket
    reader: FrameReader
    received: Received

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_ws(port: int, path: str = "/v1/stream", key: str | None = None, rcvbuf: int | None = None,
               headers: list[tuple[str, str]] | None = None, timeout: float = 5.0) -> RawClient:
    """Upgrade over a raw socket (a small `rcvbuf` makes a client that stops reading fill up fast)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(path, key, headers))
    head = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in head and time.monotonic() < deadline and len(head) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status, _, rest = head.partition(b"\r\n\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"upgrade refused: {status[:200]!r}")
    received = Received()
    reader = FrameReader(received)
    reader.feed(rest, time.monotonic())
    return RawClient(sock, reader, received)


def rst_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that vanishes does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class FloodResult:
    sent: int
    seconds: float
    received: Received


def flood(client: RawClient, frame: bytes, total: int, seconds: float, read: bool = True,
          chunk: int = 65536, until_eof: bool = False) -> FloodResult:
    """Send `frame` over and over until `total` bytes are out, the server ends the TCP stream, or
    `seconds` pass. With `read`, everything the server sends is parsed as it comes (a close frame
    does not stop the flood: an attacker keeps going); without, nothing is ever read. With
    `until_eof`, once all is sent keep reading until the server ends the stream (without `read`:
    hold the connection) until `seconds` pass: the kernel takes megabytes at once, the server
    reads them later.
    """
    sock = client.sock
    sock.setblocking(False)
    blob = frame * max(1, chunk // len(frame))
    start = time.monotonic()
    deadline = start + seconds
    sent, offset = 0, 0
    received = client.received
    while sent < total and received.eof_at is None:
        now = time.monotonic()
        if now >= deadline:
            break
        readers = [sock] if read else []
        r, w, _ = select.select(readers, [sock], [], min(0.05, deadline - now))
        now = time.monotonic()
        if r:
            try:
                data = sock.recv(65536)
            except OSError as exc:
                received.eof_at, received.reset = now, exc.errno == errno.ECONNRESET
                break
            if not data:
                received.eof_at = now
                break
            client.reader.feed(data, now)
        if w:
            piece = blob[offset:offset + min(len(blob) - offset, total - sent)]
            try:
                n = sock.send(piece)
            except BlockingIOError:
                continue
            except OSError as exc:  # reset by the server, or it shut down its side
                received.eof_at = now
                received.reset = exc.errno in (errno.ECONNRESET, errno.EPIPE)
                break
            sent += n
            offset = (offset + n) % len(blob)
    if until_eof and received.eof_at is None:
        if read:
            drain(client, deadline - time.monotonic())
        else:  # hold the connection, still never reading
            time.sleep(max(0.0, deadline - time.monotonic()))
    return FloodResult(sent, time.monotonic() - start, received)


def drain(client: RawClient, seconds: float, until_close: bool = False) -> Received:
    """Read and parse what the server sends until it ends the stream (or it closes, with
    `until_close`), bounded by `seconds`."""
    sock = client.sock
    sock.setblocking(False)
    received = client.received
    deadline = time.monotonic() + seconds
    while received.eof_at is None and not (until_close and received.close_at is not None):
        now = time.monotonic()
        if now >= deadline:
            break
        r, _, _ = select.select([sock], [], [], min(0.05, deadline - now))
        if not r:
            continue
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            continue
        except OSError as exc:
            received.eof_at, received.reset = time.monotonic(), exc.errno == errno.ECONNRESET
            break
        now = time.monotonic()
        if not data:
            received.eof_at = now
            break
        client.reader.feed(data, now)
    return received


def partial_upgrade(port: int, header_bytes: int) -> socket.socket:
    """Open a connection and send an upgrade request that never ends: request line, then about
    `header_bytes` of headers, without the blank line that would finish it."""
    sock = socket.socket()
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    request = upgrade_request("/v1/stream", None)[:-2]  # drop the final CRLF: still in the headers
    pad = max(0, header_bytes - len(request))
    filler = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(pad // 1013 + 1))
    sock.sendall(request + filler[:pad])
    sock.setblocking(False)
    return sock


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A one-shot HTTP/1.1 GET over a raw socket: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(data) < 1 << 22:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if sep and length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# Floods from a process of their own, so that the attacker's threads never share a GIL with the
# well-behaved client a test measures: `python -m tests.support.attackers PORT OPCODE BYTES N`.


@dataclass
class FloodReport:
    """One attacking connection, times in seconds after the flood began (None: never)."""

    sent: int
    close_code: int | None
    close_after: float | None
    eof_after: float | None
    reset: bool


class FloodProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.started = 0.0  # time.monotonic() of go() in the test's process

    async def go(self) -> None:
        assert self.proc.stdin is not None
        self.started = time.monotonic()
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    async def results(self, timeout: float) -> list[FloodReport]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        return [FloodReport(**r) for r in orjson.loads(line)]


@contextlib.asynccontextmanager
async def flood_process(port: int, opcode: int, total: int, connections: int = 1, seconds: float = 12.0,
                        read: bool = True, path: str = "/v1/stream",
                        rcvbuf: int | None = None) -> AsyncIterator[FloodProcess]:
    """Start a process that opens `connections` key-less WebSocket connections and, on go(),
    floods each with `total` bytes of empty `opcode` frames (reading, or never reading, what
    comes back). The process is killed on exit, whatever happened."""
    args = [str(port), str(opcode), str(total), str(connections), str(seconds), path,
            str(rcvbuf or 0), "read" if read else "noread"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.attackers", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 15)
        if ready.strip() != b"ready":
            raise RuntimeError(f"attacker did not connect: {ready!r}")
        yield FloodProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.attackers")
    for name in ("port", "opcode", "total", "connections"):
        parser.add_argument(name, type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("path")
    parser.add_argument("rcvbuf", type=int)
    parser.add_argument("read", choices=["read", "noread"])
    a = parser.parse_args(argv)
    clients = [connect_ws(a.port, a.path, rcvbuf=a.rcvbuf or None) for _ in range(a.connections)]
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    frame = masked_frame(a.opcode)
    with ThreadPoolExecutor(max_workers=a.connections) as pool:
        futures = [pool.submit(flood, c, frame, a.total, a.seconds, a.read == "read", until_eof=True)
                   for c in clients]
        results = [f.result() for f in futures]

    def after(t: float | None) -> float | None:
        return None if t is None else t - start

    out: list[dict[str, Any]] = [
        asdict(FloodReport(r.sent, r.received.close_code, after(r.received.close_at),
                           after(r.received.eof_at), r.received.reset))
        for r in results
    ]
    print(orjson.dumps(out).decode(), flush=True)
    for c in clients:
        c.close()


if __name__ == "__main__":
    _main(sys.argv[1:])
