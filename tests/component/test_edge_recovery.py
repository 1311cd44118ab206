"""Positions on a live in-process edge: exact resume or refusal, resets, no duplicates."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Collection

import pytest
from websockets.asyncio.client import connect

from edge.app import EdgeApp
from edge.hub import Hub
from shared.bus import Message
from shared.memory_bus import MemoryBus, MemorySubscriber
from shared.settings import EdgeSettings
from shared.tick import Tick, encode_tick
from tests.component.conftest import STATIC_KEY, Edge, StartEdge
from tests.support.client import live_ticks, open_native, recv_json, send_json


async def subscribe(ws: object, since: object | None = None) -> dict[str, object]:
    msg: dict[str, object] = {"op": "subscribe", "symbols": ["EURUSD"]}
    if since is not None:
        msg["since"] = {"EURUSD": since}
    await send_json(ws, msg)  # type: ignore[arg-type]
    return await recv_json(ws)  # type: ignore[arg-type]


async def test_resume_with_epoch_replays_exactly_the_missed_ticks(edge: Edge) -> None:
    await edge.tick("EURUSD", 5)  # seqs 2..6
    async with await open_native(edge.port, STATIC_KEY) as ws:
        reply = await subscribe(ws, {"epoch": "e1", "seq": 3})
        assert reply["recovered"] == {"EURUSD": True}
        assert [t["seq"] for t in await live_ticks(ws, 3)] == [4, 5, 6]
        await edge.tick("EURUSD")
        assert [t["seq"] for t in await live_ticks(ws, 1)] == [7]  # live follows, no duplicate


async def test_resume_with_nothing_missed_sends_nothing_again(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        reply = await subscribe(ws, {"epoch": "e1", "seq": 1})
        assert reply["recovered"] == {"EURUSD": True}
        await edge.tick("EURUSD")
        assert (await recv_json(ws))["seq"] == 2  # not seq 1 again


async def test_resume_in_another_epoch_is_refused_with_a_snapshot(edge: Edge) -> None:
    await edge.tick("EURUSD", 3)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        reply = await subscribe(ws, {"epoch": "old", "seq": 2})
        assert reply["recovered"] == {"EURUSD": False}
        snap = await recv_json(ws)
        assert snap["snapshot"] is True and (snap["epoch"], snap["seq"]) == ("e1", 4)


async def test_resume_beyond_the_replay_limit_is_refused_not_partial(start_edge: StartEdge) -> None:
    edge = await start_edge(replay_limit=3)
    await edge.tick("EURUSD", 10)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        reply = await subscribe(ws, 1)
        assert reply["recovered"] == {"EURUSD": False}
        assert (await recv_json(ws))["snapshot"] is True


async def test_a_new_epoch_is_announced_with_reset_before_its_first_tick(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await subscribe(ws)
        await recv_json(ws)  # snapshot e1:1
        edge.epoch, edge.seqs["EURUSD"] = "e2", 0  # an ingestor with no state anywhere
        await edge.tick("EURUSD", 2)
        reset = await recv_json(ws)
        assert reset == {"type": "reset", "symbol": "EURUSD", "epoch": "e2",
                         "reason": "stream restarted: history lost"}
        assert [(t["epoch"], t["seq"]) for t in await live_ticks(ws, 2)] == [("e2", 1), ("e2", 2)]


async def test_a_tick_lost_on_the_bus_is_repaired_before_later_ones(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await subscribe(ws)
        await recv_json(ws)
        subscriber = edge.bus.subscribers[0]
        subscriber.symbols.discard("EURUSD")  # pub/sub silently drops the next two ticks
        await edge.tick("EURUSD", 2)
        subscriber.symbols.add("EURUSD")
        await edge.tick("EURUSD", 2)
        assert [t["seq"] for t in await live_ticks(ws, 4)] == [2, 3, 4, 5]


async def test_cancelling_a_subscribe_at_every_await_leaves_no_reference_behind(edge: Edge) -> None:
    hub: Hub = edge.app.server.hub
    for delay in (0, 0.0005, 0.001, 0.002, 0.005, 0.01):
        ws = await open_native(edge.port, STATIC_KEY)
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD", "USDJPY"]})
        await asyncio.sleep(delay)
        ws.transport.abort()  # gone mid-subscribe, wherever the edge is in it
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not hub.symbols() and not edge.bus.subscribers[0].symbols:
            break
    assert hub.symbols() == set() and edge.bus.subscribers[0].symbols == set()


def raw_upgrade(port: int, extra: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall((f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")
                 .encode())
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


async def test_duplicate_security_headers_answer_400_not_500(edge: Edge) -> None:
    for header in ("X-API-Key: a\r\nX-API-Key: b\r\n", "Origin: a\r\nOrigin: b\r\n",
                   "X-Real-IP: 1.2.3.4\r\nX-Real-IP: 5.6.7.8\r\n"):
        sock = await asyncio.to_thread(raw_upgrade, edge.port, header)
        response = await asyncio.to_thread(read_all, sock)
        sock.close()
        assert response.startswith(b"HTTP/1.1 400"), (header, response[:40])


async def test_bytes_pipelined_after_an_http_request_are_dropped_cleanly(edge: Edge) -> None:
    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n\x81\x85junk")
            return read_all(sock)

    response = await asyncio.to_thread(exchange)
    assert response.startswith(b"HTTP/1.1 200") and response.count(b"HTTP/1.1") == 1


async def test_invalid_utf8_closes_1007(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await ws.send(b"\xff\xfe", text=True)
        await ws.wait_closed()
        assert ws.close_code == 1007


async def test_a_queued_auth_frame_does_nothing_once_closing(start_edge: StartEdge) -> None:
    edge = await start_edge(auth_timeout=0.2)

    def late_login() -> bytes:
        with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
            sock.sendall(b"GET /feedadv HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            time.sleep(0.4)  # the auth deadline passed: close 4001 was sent, we did not read it
            payload = ('{"userKey":"' + STATIC_KEY + '","symbol":"EURUSD"}').encode()
            sock.sendall(bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            return read_all(sock)

    received = await asyncio.to_thread(late_login)
    assert b"\x88" in received and (4001).to_bytes(2, "big") in received  # the close frame
    assert b"EURUSD" not in received  # no snapshot, no tick: the late login never ran


async def test_a_second_tradermade_login_with_another_key_is_refused(edge: Edge) -> None:
    await edge.add_key("other-key", "other")
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        assert await ws.recv() == "Connected"
        await ws.send('{"userKey":"' + STATIC_KEY + '","symbol":"EURUSD"}')
        assert '"EURUSD"' in str(await ws.recv())
        await ws.send('{"userKey":"other-key","symbol":"EURUSD,GBPUSD"}')
        reply = await asyncio.wait_for(ws.recv(), 5)
        assert "another userKey" in str(reply)


class GatedBus(MemoryBus):
    """A memory bus whose subscribe, last or history can hang, to leave at exactly that await."""

    def __init__(self, point: str) -> None:
        super().__init__()
        self.point = point
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def wait(self, point: str) -> None:
        if point == self.point:
            self.reached.set()
            await self.gate.wait()

    async def last(self, symbols: Collection[str] | None = None) -> dict[str, bytes]:
        await self.wait("last")
        return await super().last(symbols)

    async def history(self, symbol: str, after_seq: int, limit: int) -> list[bytes]:
        await self.wait("history")
        return await super().history(symbol, after_seq, limit)

    def subscriber(self, on_tick, on_control, on_state, *_):  # type: ignore[no-untyped-def]
        bus = self

        class Gated(MemorySubscriber):
            async def subscribe(self, symbols: Collection[str]) -> None:
                await bus.wait("subscribe")
                await super().subscribe(symbols)

        return Gated(self, on_tick, on_control, on_state)


@pytest.mark.parametrize("point", ["subscribe", "last", "history"])
async def test_a_client_gone_at_each_await_of_a_subscribe_leaves_exactly_nothing(point: str) -> None:
    bus = GatedBus(point)
    for symbol in ("EURUSD", "GBPUSD", "USDJPY"):
        for seq in (1, 2, 3):
            tick = Tick(symbol, 1.1, 1.2, 1.15, 1, "e1", seq)
            await bus.publish([Message(symbol, seq, encode_tick(tick))])
    app = EdgeApp(EdgeSettings(host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console"),
                  bus, None)
    port = await app.start()
    try:
        keeper = await open_native(port, STATIC_KEY)  # holds GBPUSD all along
        bus.point = ""
        await send_json(keeper, {"op": "subscribe", "symbols": ["GBPUSD"]})
        await recv_json(keeper)
        bus.point = point
        ws = await open_native(port, STATIC_KEY)
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "USDJPY"],
                             "since": {"EURUSD": {"epoch": "e1", "seq": 1}}})
        await asyncio.wait_for(bus.reached.wait(), 5)
        ws.transport.abort()  # gone while the edge awaits `point`
        await asyncio.sleep(0.05)
        bus.gate.set()
        hub = app.server.hub
        for _ in range(100):
            await asyncio.sleep(0.01)
            if hub.symbols() == {"GBPUSD"} and bus.subscribers[0].symbols == {"GBPUSD"}:
                break
        assert hub.symbols() == {"GBPUSD"} and bus.subscribers[0].symbols == {"GBPUSD"}
        await keeper.close()
    finally:
        await app.stop(drain_timeout=0)
        await bus.close()
