"""A simulated TraderMade-style vendor feed: random-walk forex quotes over WebSocket.

Besides the feed, two plain HTTP GETs for tests: `/sessions` (each logged-in connection and its
symbols, as JSON) and `/stall?symbol=EURUSD` (the connection carrying it goes silent, open).
Also for tests: `notify_unknown=False` ignores symbols outside the catalogue without a word, as
the real feed does; a symbol in `quiet` is carried but not quoted (a market that stopped moving),
any name (`--quiet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ingestor.vendors.tradermade import UNKNOWN_PREFIX

log = logging.getLogger("fxproxy.simfeed")

# Mid prices around late 2024, and the decimals each pair is quoted to.
PAIRS: dict[str, tuple[float, int]] = {
    "EURUSD": (1.0850, 5), "GBPUSD": (1.2700, 5), "USDJPY": (151.50, 3),
    "AUDUSD": (0.6550, 5), "USDCAD": (1.3900, 5), "USDCHF": (0.8800, 5),
    "NZDUSD": (0.5900, 5), "EURGBP": (0.8550, 5), "EURJPY": (164.40, 3),
    "GBPJPY": (192.40, 3), "EURCHF": (0.9550, 5), "AUDJPY": (99.20, 3),
    "EURAUD": (1.6560, 5), "USDSEK": (10.950, 4), "USDNOK": (11.050, 4),
    "USDMXN": (20.150, 4), "USDSGD": (1.3450, 5), "XAUUSD": (2650.00, 2),
}
LOGIN_TIMEOUT = 10.0


@dataclass(slots=True)
class Client:
    """One logged-in connection: what it streams now."""

    peer: str
    symbols: list[str] = field(default_factory=list)
    stalled: bool = False


@dataclass(slots=True)
class Walk:
    """A mid price taking small Gaussian steps, with a spread of about a pip."""

    mid: float
    decimals: int
    rng: random.Random

    def step(self) -> tuple[float, float, float]:
        self.mid *= math.exp(self.rng.gauss(0.0, 0.00005))
        pip = 10.0 ** -(self.decimals - 1)
        half = pip * self.rng.uniform(0.3, 0.8)
        bid = round(self.mid - half, self.decimals)
        ask = round(self.mid + half, self.decimals)
        if ask <= bid:  # rounding must never cross the quote
            ask = round(bid + 10.0 ** -self.decimals, self.decimals)
        return bid, ask, round((bid + ask) / 2, self.decimals + 1)


class SimFeed:
    def __init__(self, key: str, rate: float, max_connections: int = 0, seed: int | None = None,
                 max_symbols: int = 0, notify_unknown: bool = True, quiet: Iterable[str] = ()) -> None:
        self._key = key
        self._notify_unknown = notify_unknown
        self.quiet = set(quiet)
        self._rate = rate
        self._max_connections = max_connections
        self._max_symbols = max_symbols
        self.logged_in = 0
        self.clients: list[Client] = []
        rng = random.Random(seed)
        self._walks = {s: Walk(mid, d, rng) for s, (mid, d) in PAIRS.items()}
        for symbol in self.quiet - self._walks.keys():  # carried, so never "unknown"
            self._walks[symbol] = Walk(1.0, 5, rng)
        self.server: Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await serve(self._handle, host, port, compression=None,
                                  process_request=self._http)
        bound: int = next(iter(self.server.sockets)).getsockname()[1]
        log.info("simfeed listening", extra={"host": host, "port": bound, "pairs": len(PAIRS)})
        return bound

    async def _handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        try:
            await ws.send("Connected")
            raw = await asyncio.wait_for(ws.recv(), LOGIN_TIMEOUT)
            symbols = self._login(raw)
            if symbols is None:
                log.info("rejected login", extra={"peer": str(peer)})
                await ws.send("Invalid user key")
                await ws.close(1008, "invalid userKey")
                return
            if self._max_connections and self.logged_in >= self._max_connections:
                log.info("refused a connection over the limit", extra={"peer": str(peer)})
                await ws.send("User Key Used to many times")  # what the real feed says
                await ws.close(1008, "connection limit")
                return
            client = Client(str(peer))
            if not await self._subscribe(ws, client, symbols):
                return
            log.info("client logged in", extra={"peer": client.peer, "symbols": client.symbols})
            self.logged_in += 1
            self.clients.append(client)
            streaming = asyncio.create_task(self._stream(ws, client))
            try:
                # A later login frame on the same connection replaces its symbols.
                async for raw in ws:
                    symbols = self._login(raw)
                    if symbols is None:
                        await ws.send("Invalid user key")
                        await ws.close(1008, "invalid userKey")
                        return
                    if not await self._subscribe(ws, client, symbols):
                        return
                    log.info("client changed symbols", extra={"peer": client.peer,
                                                              "symbols": client.symbols})
            finally:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await streaming
                self.logged_in -= 1
                self.clients.remove(client)
        except (ConnectionClosed, TimeoutError):
            return

    async def _subscribe(self, ws: ServerConnection, client: Client, wanted: list[str]) -> bool:
        """Carry what the catalogue has; name the rest; refuse a set over the per-session cap."""
        carried = [s for s in wanted if s in self._walks]
        unknown = [s for s in wanted if s not in self._walks]
        if self._max_symbols and len(carried) > self._max_symbols:
            log.info("refused a login over the symbol limit", extra={"peer": client.peer,
                                                                     "symbols": len(carried)})
            await ws.send(f"Too many symbols: at most {self._max_symbols} per connection")
            await ws.close(1008, "symbol limit")
            return False
        if unknown and self._notify_unknown:
            await ws.send(UNKNOWN_PREFIX + ",".join(unknown))
        client.symbols = carried
        return True

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """The test endpoints; anything else goes on to the WebSocket handshake."""
        url = urlsplit(request.path)
        if url.path == "/sessions":
            body = [{"peer": c.peer, "symbols": c.symbols, "stalled": c.stalled} for c in self.clients]
            return connection.respond(HTTPStatus.OK, orjson.dumps(body).decode() + "\n")
        if url.path == "/stall":
            symbol = parse_qs(url.query).get("symbol", [""])[0]
            hit = [c for c in self.clients if symbol in c.symbols]
            for c in hit:
                c.stalled = True
            log.info("stalled sessions", extra={"symbol": symbol, "sessions": len(hit)})
            return connection.respond(HTTPStatus.OK if hit else HTTPStatus.NOT_FOUND, f"{len(hit)}\n")
        return None

    def _login(self, raw: str | bytes) -> list[str] | None:
        try:
            msg = orjson.loads(raw)
            key, wanted = str(msg["userKey"]), str(msg["symbol"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if not hmac.compare_digest(key.encode(), self._key.encode()):
            return None
        return [s.strip() for s in wanted.split(",") if s.strip()]

    async def _stream(self, ws: ServerConnection, client: Client) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        i = 0
        while True:
            symbols = [s for s in client.symbols if s not in self.quiet] if self.quiet else client.symbols
            if not symbols or client.stalled:
                await asyncio.sleep(0.05)
                next_at = loop.time()
                continue
            interval = 1.0 / (self._rate * len(symbols))
            symbol = symbols[i % len(symbols)]
            i += 1
            bid, ask, mid = self._walks[symbol].step()
            tick = {"symbol": symbol, "ts": str(int(time.time() * 1000)),
                    "bid": bid, "ask": ask, "mid": mid}
            await ws.send(orjson.dumps(tick).decode())
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_at = loop.time()  # fell far behind: don't burst to catch up

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
