"""Baseline WebSocket fan-out servers for the benchmark ("the naive design").

Speaks the same wire protocol as the fxproxy edge (subset):

* ``GET /v1/stream?api_key=KEY`` — the key must equal ``--key`` / ``$BENCH_KEY``
  (otherwise HTTP 401 before the upgrade);
* client frame ``{"op":"subscribe","symbols":[...],"id":1}`` -> reply
  ``{"type":"subscribed","id":1,"symbols":[...]}``, then one snapshot per symbol
  from ``HGET fx:last`` (with ``"snapshot":true``), then live ticks: the exact
  bytes published on ``fx:tick:{SYMBOL}``, as text frames.

Modes:

``--mode naive`` (default)
    stock asyncio loop; one ``redis.asyncio`` PubSub (``PSUBSCRIBE fx:tick:*``);
    for each message ``await asyncio.gather(*(ws.send(payload) for ws in subs))``.
    One slow client stalls everyone: this is the point of the baseline.
``--mode broadcast``
    uvloop + ``websockets.broadcast(subs, payload)`` (no awaiting, no backpressure).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import redis.asyncio as aioredis
from websockets import broadcast
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("naive_server")


class Hub:
    """Subscriptions: symbol -> set of connections."""

    def __init__(self) -> None:
        self.subs: dict[str, set[ServerConnection]] = {}

    def add(self, ws: ServerConnection, symbols: Iterable[str]) -> None:
        for sym in symbols:
            self.subs.setdefault(sym, set()).add(ws)

    def remove(self, ws: ServerConnection, symbols: Iterable[str] | None = None) -> None:
        for sym in list(self.subs) if symbols is None else symbols:
            conns = self.subs.get(sym)
            if conns is not None:
                conns.discard(ws)
                if not conns:
                    del self.subs[sym]


class NaiveServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key: str = args.key
        self.prefix: str = args.prefix
        self.mode: str = args.mode
        self.hub = Hub()
        self.redis: aioredis.Redis = aioredis.from_url(args.redis_url)

    # --- handshake -----------------------------------------------------------------
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != "/v1/stream":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        keys = parse_qs(url.query).get("api_key", [])
        if not keys or not hmac.compare_digest(keys[0].encode(), self.key.encode()):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        return None

    # --- per-connection handler ---------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        mine: set[str] = set()
        try:
            async for message in ws:
                try:
                    frame: Any = orjson.loads(message)
                except orjson.JSONDecodeError:
                    await self.send_error(ws, None, "bad_request", "invalid JSON")
                    continue
                if not isinstance(frame, dict):
                    await self.send_error(ws, None, "bad_request", "expected an object")
                    continue
                op = frame.get("op")
                fid = frame.get("id")
                symbols = frame.get("symbols")
                if op in ("subscribe", "unsubscribe"):
                    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
                        await self.send_error(ws, fid, "bad_request", "symbols must be a list of strings")
                        continue
                    syms = [s.upper() for s in symbols]
                    if op == "subscribe":
                        await self.subscribe(ws, fid, syms, mine)
                    else:
                        mine.difference_update(syms)
                        self.hub.remove(ws, syms)
                        await ws.send(
                            orjson.dumps({"type": "unsubscribed", "id": fid, "symbols": syms}),
                            text=True,
                        )
                elif op == "ping":
                    await ws.send(orjson.dumps({"type": "pong", "id": fid}), text=True)
                else:
                    await self.send_error(ws, fid, "bad_request", "unknown op")
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove(ws, mine)

    async def subscribe(self, ws: ServerConnection, fid: Any, syms: list[str], mine: set[str]) -> None:
        new = [s for s in syms if s not in mine]
        mine.update(new)
        self.hub.add(ws, new)
        await ws.send(orjson.dumps({"type": "subscribed", "id": fid, "symbols": syms}), text=True)
        if new:
            snaps = await self.redis.hmget(f"{self.prefix}last", new)
            for snap in snaps:
                if isinstance(snap, bytes) and snap:
                    await ws.send(snap[:-1] + b',"snapshot":true}', text=True)

    async def send_error(self, ws: ServerConnection, fid: Any, code: str, message: str) -> None:
        await ws.send(orjson.dumps({"type": "error", "id": fid, "code": code, "message": message}), text=True)

    # --- fan-out -------------------------------------------------------------------------
    async def pump(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pattern = f"{self.prefix}tick:*"
        cut = len(self.prefix) + len("tick:")
        await pubsub.psubscribe(pattern)
        log.info("subscribed to %s", pattern)
        try:
            async for msg in pubsub.listen():
                if msg.get("type") != "pmessage":
                    continue
                channel = msg["channel"]
                symbol = (channel.decode() if isinstance(channel, bytes) else str(channel))[cut:]
                payload: bytes = msg["data"]
                conns = self.hub.subs.get(symbol)
                if not conns:
                    continue
                if self.mode == "broadcast":
                    broadcast(conns, payload, text=True)
                else:
                    await asyncio.gather(
                        *(ws.send(payload, text=True) for ws in list(conns)), return_exceptions=True
                    )
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def run(self) -> None:
        await self.redis.ping()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server: Server
        async with serve(
            self.handler,
            self.args.host,
            self.args.port,
            process_request=self.process_request,
            compression=None,
            backlog=self.args.backlog,
            max_size=64 * 1024,
        ) as server:
            pump = asyncio.create_task(self.pump())
            log.warning("naive server (%s) listening on %s:%d", self.mode, self.args.host, self.args.port)
            done, _ = await asyncio.wait(
                [pump, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if pump in done:
                pump.result()  # re-raise a pump failure
            pump.cancel()
            server.close()
        await self.redis.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6380/0"))
    p.add_argument("--key", default=os.environ.get("BENCH_KEY", "benchkey"), help="accepted api_key")
    p.add_argument("--prefix", default="fx:", help="key/channel prefix")
    p.add_argument("--mode", choices=("naive", "broadcast"), default="naive")
    p.add_argument("--backlog", type=int, default=1024)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    loop_factory = None
    if args.mode == "broadcast":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(NaiveServer(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
