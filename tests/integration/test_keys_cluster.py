"""API keys across a cluster of edge processes on one real Redis, driven through the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import cast

import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.conftest import Cluster
from tests.support.client import closed_code, open_native, recv_json, send_json

pytestmark = pytest.mark.integration


def keys_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fxproxy", "keys", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=30)


def create_key(redis_url: str, name: str, *extra: str) -> str:
    out = keys_cli(redis_url, "create", "--name", name, *extra)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("fxp_") and len(key) >= 4 + 32  # 192 random bits, url-safe base64
    return key


async def test_keys_are_stored_only_hashed_and_never_logged(cluster: Cluster) -> None:
    key = create_key(cluster.redis_url, "alice", "--symbols", "EUR*")
    proc, port = cluster.edge()
    async with await open_native(port, key) as ws:
        await send_json(ws, {"op": "ping", "id": 1})
        assert (await recv_json(ws))["type"] == "pong"
    with pytest.raises(InvalidStatus):
        await open_native(port, key + "x")
    client = redis.Redis.from_url(cluster.redis_url)
    dump = b"".join(k + repr(client.dump(k)).encode() for k in cast(list[bytes], client.keys("*")))
    client.close()
    assert key.encode() not in dump
    listing = keys_cli(cluster.redis_url, "list")
    assert "alice" in listing.stdout and "EUR*" in listing.stdout and key not in listing.stdout
    proc.terminate()
    assert key not in proc.log


async def test_duplicate_key_name_is_refused(cluster: Cluster) -> None:
    create_key(cluster.redis_url, "bob")
    out = keys_cli(cluster.redis_url, "create", "--name", "bob")
    assert out.returncode == 1 and "exists already" in out.stderr


async def test_revoked_key_closes_live_connections_on_every_edge_within_1s(cluster: Cluster) -> None:
    key = create_key(cluster.redis_url, "carol")
    _, port1 = cluster.edge()
    _, port2 = cluster.edge()
    conns = [await open_native(p, key) for p in (port1, port2, port2)]
    for ws in conns:
        await send_json(ws, {"op": "ping"})
        await recv_json(ws)
    started = time.monotonic()
    assert keys_cli(cluster.redis_url, "revoke", "carol").returncode == 0
    revoked_at = time.monotonic()

    async def closed_after(ws: ClientConnection) -> tuple[int | None, float]:
        code = await closed_code(ws, 3)
        return code, time.monotonic() - revoked_at

    closes = await asyncio.gather(*(closed_after(ws) for ws in conns))
    assert [code for code, _ in closes] == [4003, 4003, 4003]
    # Per connection, from the CLI's exit (it published the event before exiting); the edges'
    # logs say when each acted on it.
    took = [round(t, 2) for _, t in closes]
    assert max(took) < 1.0, f"closed {took} s after the CLI exited ({revoked_at - started:.2f} s in it)"
    with pytest.raises(InvalidStatus) as info:
        await open_native(port1, key)
    assert info.value.response.status_code == 401


async def test_narrowing_a_key_unsubscribes_disallowed_symbols_live(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    key = create_key(cluster.redis_url, "dave")
    _, port = cluster.edge()
    await asyncio.sleep(1)
    async with await open_native(port, key) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"]})
        assert (await recv_json(ws))["type"] == "subscribed"
        assert keys_cli(cluster.redis_url, "update", "dave", "--symbols", "EUR*").returncode == 0
        async with asyncio.timeout(3):
            while (msg := await recv_json(ws))["type"] != "unsubscribed":
                pass
        assert msg["symbols"] == ["GBPUSD"]
        after = [await recv_json(ws) for _ in range(20)]
        assert {m["symbol"] for m in after} == {"EURUSD"}


async def test_connection_limit_counts_across_edges_and_frees_when_an_edge_dies(cluster: Cluster) -> None:
    key = create_key(cluster.redis_url, "erin", "--max-connections", "2")
    _, port1 = cluster.edge(FXPROXY_HEARTBEAT_INTERVAL="0.3")
    proc2, port2 = cluster.edge(FXPROXY_HEARTBEAT_INTERVAL="0.3")
    a = await open_native(port1, key)
    b = await open_native(port2, key)
    with pytest.raises(InvalidStatus) as info:
        await open_native(port1, key)
    assert info.value.response.status_code == 429
    await a.close()
    await asyncio.sleep(0.2)
    c = await open_native(port1, key)  # a's slot was released on close
    proc2.kill()  # b's edge dies without releasing anything
    await b.close()
    deadline = time.monotonic() + 5
    while True:  # its slot stops counting once its heartbeat is 3 intervals old
        try:
            d = await open_native(port1, key)
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "dead edge's slot never freed"
            await asyncio.sleep(0.2)
    await c.close()
    await d.close()


async def test_an_edge_restarted_in_place_under_the_same_id_does_not_inherit_its_slots(
    cluster: Cluster,
) -> None:
    # As a Kubernetes container restarted in its pod: same FXPROXY_EDGE_ID, the old process
    # killed without releasing anything. Its slot must free with its heartbeat (3 x 0.3 s),
    # not come back to life as the new process's own.
    key = create_key(cluster.redis_url, "gina", "--max-connections", "1")
    env = {"FXPROXY_EDGE_ID": "pod-0", "FXPROXY_HEARTBEAT_INTERVAL": "0.3"}
    old, port = cluster.edge(**env)
    held = await open_native(port, key)
    old.kill()
    await held.close()
    _, port = cluster.edge(**env)
    restarted_at = time.monotonic()
    while True:
        try:
            ws = await open_native(port, key)
            break
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            assert time.monotonic() - restarted_at < 6, "the dead process's slot was inherited"
            await asyncio.sleep(0.1)
    took = time.monotonic() - restarted_at
    print(f"slot of the killed pod-0 free {took:.2f} s after the restart (heartbeat expiry 0.9 s)")
    assert took < 3.0
    with pytest.raises(InvalidStatus) as info:
        await open_native(port, key)
    assert info.value.response.status_code == 429  # and the limit still holds
    await ws.close()


@pytest.mark.parametrize("argv", [
    ["create", "--name", "frank", "--symbols", ""],  # once created an all-symbols key
    ["create", "--name", "fr\x1b[31mank"],
    ["create", "--name", "frank", "--max-connections", "-1"],
])
def test_keys_cli_refuses_what_may_not_be_stored_and_stores_nothing(redis_url: str, argv: list[str]) -> None:
    out = keys_cli(redis_url, *argv)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    client = redis.Redis.from_url(redis_url)
    assert client.keys("*") == []
    client.close()


def test_keys_update_with_no_symbols_is_refused_and_leaves_the_key_as_it_was(redis_url: str) -> None:
    create_key(redis_url, "gina", "--symbols", "EUR*")
    out = keys_cli(redis_url, "update", "gina", "--symbols", " , ")
    assert out.returncode == 2 and "'*' for all symbols" in out.stderr, out.stderr
    row = next(line for line in keys_cli(redis_url, "list").stdout.splitlines() if line.startswith("gina"))
    assert row.endswith("EUR*"), row
