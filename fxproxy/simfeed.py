"""A simulated TraderMade-style vendor feed: random-walk forex quotes over WebSocket."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import random
import time
from dataclasses import dataclass

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

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
    def __init__(self, key: str, rate: float, max_connections: int = 0, seed: int | None = None) -> None:
        self._key = key
        self._rate = rate
        self._max_connections = max_connections
        self.logged_in = 0
        rng = random.Random(seed)
        self._walks = {s: Walk(mid, d, rng) for s, (mid, d) in PAIRS.items()}
        self.server: Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await serve(self._handle, host, port, compression=None)
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
            log.info("client logged in", extra={"peer": str(peer), "symbols": len(symbols)})
            self.logged_in += 1
            try:
                await self._stream(ws, symbols)
            finally:
                self.logged_in -= 1
        except (ConnectionClosed, TimeoutError):
            return

    def _login(self, raw: str | bytes) -> list[str] | None:
        try:
            msg = orjson.loads(raw)
            key, wanted = str(msg["userKey"]), str(msg["symbol"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if not hmac.compare_digest(key.encode(), self._key.encode()):
            return None
        # Like the real feed: symbols it does not carry are ignored.
        return [s.strip() for s in wanted.split(",") if s.strip() in self._walks]

    async def _stream(self, ws: ServerConnection, symbols: list[str]) -> None:
        if not symbols:
            await ws.wait_closed()
            return
        interval = 1.0 / (self._rate * len(symbols))
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        i = 0
        while True:
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
