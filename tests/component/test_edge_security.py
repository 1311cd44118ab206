"""Every protection of an internet-facing edge, each pinned by a test that fails without it."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shared.keystore import key_changed_event
from tests.component.conftest import STATIC_KEY, Edge, StartEdge
from tests.support.client import open_native, recv_json, send_json, until


async def closed_with(ws: object, timeout: float = 3.0) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:  # type: ignore[attr-defined]
                pass
    except ConnectionClosed:
        pass
    return ws.close_code  # type: ignore[attr-defined,no-any-return]


# Handshake


@pytest.mark.parametrize("where", ["bearer", "x-api-key", "query"])
async def test_key_accepted_in_each_documented_place(edge: Edge, where: str) -> None:
    headers, path = {}, "/v1/stream"
    if where == "bearer":
        headers["Authorization"] = f"Bearer {STATIC_KEY}"
    elif where == "x-api-key":
        headers["X-API-Key"] = STATIC_KEY
    else:
        path += f"?api_key={STATIC_KEY}"
    async with connect(f"ws://127.0.0.1:{edge.port}{path}", additional_headers=headers) as ws:
        await send_json(ws, {"op": "ping", "id": 1})
        assert await recv_json(ws) == {"type": "pong", "id": 1}


async def test_bad_key_gets_401_before_upgrade(edge: Edge) -> None:
    with pytest.raises(InvalidStatus) as info:
        await open_native(edge.port, "wrong")
    assert info.value.response.status_code == 401


async def test_disallowed_origin_gets_403(start_edge: StartEdge) -> None:
    edge = await start_edge(allowed_origins=["https://app.example"])
    with pytest.raises(InvalidStatus) as info:
        await open_native(edge.port, STATIC_KEY, origin="https://evil.example")
    assert info.value.response.status_code == 403
    async with await open_native(edge.port, STATIC_KEY, origin="https://app.example"):
        pass


async def test_auth_by_first_frame_works_within_timeout(edge: Edge) -> None:
    async with await open_native(edge.port, None) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "id": 1})
        assert (await recv_json(ws))["code"] == "unauthorized"
        await send_json(ws, {"op": "auth", "key": STATIC_KEY, "id": 2})
        assert await recv_json(ws) == {"type": "authenticated", "id": 2, "key": "static-1"}
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"], "id": 3})
        assert (await recv_json(ws))["type"] == "subscribed"


async def test_no_auth_frame_within_timeout_closes_4001(start_edge: StartEdge) -> None:
    edge = await start_edge(auth_timeout=0.3)
    async with await open_native(edge.port, None) as ws:
        assert await closed_with(ws) == 4001


async def test_bad_key_in_auth_frame_closes_4001(edge: Edge) -> None:
    async with await open_native(edge.port, None) as ws:
        await send_json(ws, {"op": "auth", "key": "wrong"})
        assert await closed_with(ws) == 4001


async def test_handshake_rate_limit_per_ip_answers_429(start_edge: StartEdge) -> None:
    edge = await start_edge(handshake_rate=0.01, handshake_burst=3)
    for _ in range(3):
        async with await open_native(edge.port, STATIC_KEY):
            pass
    with pytest.raises(InvalidStatus) as info:
        await open_native(edge.port, STATIC_KEY)
    assert info.value.response.status_code == 429


async def test_rate_limit_uses_forwarded_ip_only_from_trusted_proxy(start_edge: StartEdge) -> None:
    edge = await start_edge(handshake_rate=0.01, handshake_burst=1)
    # Loopback is a trusted proxy by default: each forwarded client has its own bucket.
    for client in ("203.0.113.1", "203.0.113.2"):
        async with await open_native(edge.port, STATIC_KEY, headers={"X-Forwarded-For": client}):
            pass
    untrusted = await start_edge(handshake_rate=0.01, handshake_burst=1, trusted_proxies=["10.0.0.0/8"])
    async with await open_native(untrusted.port, STATIC_KEY, headers={"X-Forwarded-For": "203.0.113.3"}):
        pass
    with pytest.raises(InvalidStatus) as info:  # spoofed header from an untrusted peer: same bucket
        await open_native(untrusted.port, STATIC_KEY, headers={"X-Forwarded-For": "203.0.113.4"})
    assert info.value.response.status_code == 429


async def test_edge_connection_limit_answers_503(start_edge: StartEdge) -> None:
    edge = await start_edge(max_connections=2)
    async with await open_native(edge.port, STATIC_KEY), await open_native(edge.port, STATIC_KEY):
        with pytest.raises(InvalidStatus) as info:
            await open_native(edge.port, STATIC_KEY)
        assert info.value.response.status_code == 503


async def test_slowloris_client_is_dropped_after_handshake_timeout(start_edge: StartEdge) -> None:
    edge = await start_edge(handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # the edge hung up
    writer.close()


# Key records


async def test_key_connection_limit_refuses_extra_connections(edge: Edge) -> None:
    await edge.add_key("limited-key", "limited", max_connections=1)
    async with await open_native(edge.port, "limited-key"):
        with pytest.raises(InvalidStatus) as info:
            await open_native(edge.port, "limited-key")
        assert info.value.response.status_code == 429
        async with await open_native(edge.port, None) as ws:  # via auth frame: close 4008
            await send_json(ws, {"op": "auth", "key": "limited-key"})
            assert await closed_with(ws) == 4008
    await asyncio.sleep(0.1)
    async with await open_native(edge.port, "limited-key"):  # freed when the first one left
        pass


async def test_entitlements_refuse_symbols_outside_the_keys_globs(edge: Edge) -> None:
    await edge.add_key("eur-key", "eur-only", symbols=("EUR*",))
    async with await open_native(edge.port, "eur-key") as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"], "id": 1})
        err = await recv_json(ws)
        assert err["code"] == "forbidden_symbol" and err["symbols"] == ["GBPUSD"]
        assert await recv_json(ws) == {"type": "subscribed", "id": 1, "symbols": ["EURUSD"]}


async def test_revoked_key_closes_live_connections_with_4003(edge: Edge) -> None:
    await edge.add_key("doomed-key", "doomed")
    async with await open_native(edge.port, "doomed-key") as ws:
        await edge.store.update("doomed", disabled=True)
        await edge.bus.publish_control(key_changed_event(next(iter(edge.store.records))))
        assert await closed_with(ws) == 4003
    with pytest.raises(InvalidStatus):
        await open_native(edge.port, "doomed-key")


async def test_narrowed_key_unsubscribes_what_it_no_longer_allows(edge: Edge) -> None:
    await edge.add_key("wide-key", "wide")
    async with await open_native(edge.port, "wide-key") as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"]})
        for _ in range(3):
            await recv_json(ws)
        key_hash = await edge.store.update("wide", symbols=("EUR*",))
        assert key_hash is not None
        await edge.bus.publish_control(key_changed_event(key_hash))
        msg = await recv_json(ws)
        assert msg["type"] == "unsubscribed" and msg["symbols"] == ["GBPUSD"]
        await edge.tick("GBPUSD")
        await edge.tick("EURUSD")
        assert (await recv_json(ws))["symbol"] == "EURUSD"


# Frames


async def test_oversized_frame_closes_1009(edge: Edge) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await ws.send("x" * 5000)
        assert await closed_with(ws) == 1009


@pytest.mark.parametrize(("frame", "code"), [
    (b"\x00\x01binary", "bad_request"),
    ("{not json", "bad_request"),
    ('{"op":"dance"}', "bad_request"),
    ('{"op":"subscribe","symbols":"EURUSD"}', "bad_request"),
    ('{"op":"subscribe","symbols":[]}', "bad_request"),
    ('{"op":"subscribe","symbols":["eurusd"]}', "bad_request"),
    ('{"op":"subscribe","symbols":["EURUSD","EURUSD"]}', "bad_request"),
    ('{"op":"subscribe","symbols":["NOSUCH"]}', "unknown_symbol"),
])
async def test_bad_frames_get_error_and_connection_stays(edge: Edge, frame: str | bytes, code: str) -> None:
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await ws.send(frame)
        assert (await recv_json(ws))["code"] == code
        await send_json(ws, {"op": "ping", "id": 1})
        assert await recv_json(ws) == {"type": "pong", "id": 1}


async def test_max_subscriptions_per_connection(start_edge: StartEdge) -> None:
    edge = await start_edge(max_subscriptions=2)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD", "USDJPY"]})
        err = await recv_json(ws)
        assert err["code"] == "too_many_subscriptions" and err["symbols"] == ["USDJPY"]


async def test_oversized_symbol_list_is_refused(start_edge: StartEdge) -> None:
    edge = await start_edge(max_symbols_per_request=2)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD", "USDJPY"]})
        assert "at most 2" in (await recv_json(ws))["message"]


async def test_frame_flood_gets_rate_limited_then_1008(start_edge: StartEdge) -> None:
    edge = await start_edge(op_rate=1, op_burst=5, max_strikes=5)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        for i in range(20):
            await send_json(ws, {"op": "ping", "id": i})
        codes = []
        with pytest.raises(ConnectionClosed):
            while True:
                codes.append((await recv_json(ws)).get("code"))
        assert "rate_limited" in codes
        assert ws.close_code == 1008


async def test_garbage_sender_is_closed_1008(start_edge: StartEdge) -> None:
    edge = await start_edge(max_strikes=3)
    async with await open_native(edge.port, STATIC_KEY) as ws:
        for _ in range(5):
            await ws.send("garbage")
        assert await closed_with(ws) == 1008


# TraderMade dialect


async def test_tradermade_bad_key_gets_text_error_then_4001(edge: Edge) -> None:
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        assert await ws.recv() == "Connected"
        await ws.send(orjson.dumps({"userKey": "wrong", "symbol": "EURUSD"}).decode())
        assert await ws.recv() == "Invalid user key"
        assert await closed_with(ws) == 4001


async def test_tradermade_malformed_login_gets_text_error_and_stays(edge: Edge) -> None:
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        await ws.recv()
        await ws.send('{"userKey": 5}')
        reply = await ws.recv()
        assert isinstance(reply, str) and reply.startswith("Error:")
        await ws.send(orjson.dumps({"userKey": STATIC_KEY, "symbol": "EURUSD"}).decode())
        assert orjson.loads(await ws.recv())["symbol"] == "EURUSD"


async def test_tradermade_flood_is_closed_1008(start_edge: StartEdge) -> None:
    edge = await start_edge(max_strikes=3)
    async with connect(f"ws://127.0.0.1:{edge.port}/feedadv") as ws:
        await ws.recv()
        for _ in range(5):
            await ws.send("garbage")
        assert await closed_with(ws) == 1008


async def test_abuser_does_not_disturb_other_clients(start_edge: StartEdge) -> None:
    edge = await start_edge(max_strikes=1000, op_rate=1000, op_burst=1000)
    good = await open_native(edge.port, STATIC_KEY)
    # The abuser never reads its error replies; an unbounded queue keeps its close prompt.
    bad = await open_native(edge.port, STATIC_KEY, max_queue=None)
    async with good, bad:
        await send_json(good, {"op": "subscribe", "symbols": ["EURUSD"]})
        await until(good, lambda m: m.get("snapshot"))
        for i in range(200):
            await bad.send("garbage" if i % 2 else b"\xff" * 100)
            if i % 10 == 0:
                await edge.tick("EURUSD")
        seqs = [(await until(good, lambda m: m.get("type") == "tick"))["seq"] for _ in range(20)]
    assert seqs == list(range(seqs[0], seqs[0] + 20))



async def test_auth_frames_sent_back_to_back_take_one_connection_slot(edge: Edge) -> None:
    await edge.add_key("one-key", "one", max_connections=1)
    async with await open_native(edge.port, None) as ws:
        await send_json(ws, {"op": "auth", "key": "one-key", "id": 1})
        await send_json(ws, {"op": "auth", "key": "one-key", "id": 2})
        assert (await recv_json(ws))["type"] == "authenticated"
        assert (await recv_json(ws))["message"] == "already authenticated"
    await asyncio.sleep(0.1)
    assert sum(edge.store.slots.values()) == 0  # the one slot taken was given back


async def test_unexpected_key_store_failure_answers_500_not_a_hang(edge: Edge) -> None:
    async def broken(key_hash: str) -> None:
        raise ValueError("corrupt")

    edge.store.get = broken  # type: ignore[method-assign]
    with pytest.raises(InvalidStatus) as info:
        await asyncio.wait_for(open_native(edge.port, "some-stored-key"), 1.5)
    assert info.value.response.status_code == 500


async def test_lowering_a_keys_connection_limit_closes_its_newest_connections(edge: Edge) -> None:
    await edge.add_key("team-key", "team", max_connections=3)
    conns = [await open_native(edge.port, "team-key") for _ in range(3)]
    await asyncio.sleep(0.05)
    key_hash = await edge.store.update("team", max_connections=1)
    assert key_hash is not None
    await edge.bus.publish_control(key_changed_event(key_hash))
    assert [await closed_with(ws) for ws in conns[1:]] == [4008, 4008]
    await send_json(conns[0], {"op": "ping", "id": 1})
    assert await recv_json(conns[0]) == {"type": "pong", "id": 1}  # the oldest one stays
    assert edge.store.slots[key_hash] == 1
    await conns[0].close()
