"""A small client that prints ticks from any edge, in either dialect."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect


def format_tick(msg: dict[str, Any]) -> str:
    flag = "  (snapshot)" if msg.get("snapshot") else ""
    seq = f"  seq {msg['seq']}" if "seq" in msg else ""
    return (f"{msg['symbol']:<7} bid {msg['bid']:<10} ask {msg['ask']:<10} "
            f"ts {msg['ts']}{seq}{flag}")


async def tail(
    url: str, key: str, symbols: list[str], *, count: int = 0, duration: float = 0.0,
    raw: bool = False, out: TextIO = sys.stdout,
) -> int:
    """Print ticks until `count` ticks or `duration` seconds (0 = no limit); return ticks seen."""
    tradermade = urlsplit(url).path.rstrip("/").endswith("/feedadv")
    headers = {} if tradermade else {"Authorization": f"Bearer {key}"}
    seen = [0]
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        if tradermade:
            greeting = await ws.recv()
            if greeting != "Connected":
                print(f"unexpected greeting: {greeting!r}", file=sys.stderr)
            await ws.send(orjson.dumps({"userKey": key, "symbol": ",".join(symbols)}).decode())
        else:
            await ws.send(orjson.dumps({"op": "subscribe", "symbols": symbols, "id": 1}).decode())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration or None):
                await _print_ticks(ws, seen, count, raw, out)
    return seen[0]


async def _print_ticks(ws: ClientConnection, seen: list[int], count: int, raw: bool, out: TextIO) -> None:
    async for frame in ws:
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError:
            print(f"server: {frame!r}", file=sys.stderr)  # TraderMade notices are plain text
            continue
        if not isinstance(msg, dict) or "bid" not in msg:
            if isinstance(msg, dict) and msg.get("type") == "error":
                print(f"error {msg.get('code')}: {msg.get('message')}", file=sys.stderr)
            continue
        seen[0] += 1
        print(frame if raw else format_tick(msg), file=out, flush=True)
        if count and seen[0] >= count:
            return
