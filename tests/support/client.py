"""Small WebSocket client helpers for tests."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


async def open_native(port: int, key: str | None, host: str = "127.0.0.1",
                      headers: dict[str, str] | None = None, **kw: Any) -> ClientConnection:
    """Connect to /v1/stream, with the key (if any) as a Bearer token."""
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    return await connect(f"ws://{host}:{port}/v1/stream", additional_headers=all_headers,
                         open_timeout=5, **kw)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    obj = orjson.loads(frame)
    assert isinstance(obj, dict), frame
    return obj


async def send_json(ws: ClientConnection, obj: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(obj).decode())


async def until(ws: ClientConnection, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Read frames until one matches `pred`; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await recv_json(ws, timeout)
            if pred(msg):
                return msg


async def live_ticks(ws: ClientConnection, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next `n` live (non-snapshot) ticks."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            msg = await recv_json(ws, timeout)
            if msg.get("type") == "tick" and not msg.get("snapshot"):
                out.append(msg)
    return out


def assert_no_gaps(ticks: list[dict[str, Any]]) -> None:
    """Per symbol, seq must grow by exactly one from tick to tick."""
    last: dict[str, int] = {}
    for t in ticks:
        sym, seq = t["symbol"], t["seq"]
        if sym in last:
            assert seq == last[sym] + 1, f"{sym}: seq {last[sym]} then {seq}"
        last[sym] = seq


async def closed_code(ws: ClientConnection, timeout: float = 10.0) -> int | None:
    """The server's close code once the connection is closed (None if it stays open)."""
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code
