"""The lease under a hung Redis (SIGSTOP): lost replies are adopted, a hang costs one TTL at most,
and the ingestor's /readyz says so while it lasts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError
from websockets.asyncio.client import ClientConnection

from ingestor.leader import RedisLeadership, lease_client
from shared.names import Names
from tests.conftest import API_KEY, Cluster
from tests.support.client import open_native, send_json
from tests.support.ports import free_port
from tests.support.procs import Proc, wait_http
from tests.support.redis_server import RedisServer
from tests.support.running import running

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def hung(server: RedisServer) -> Iterator[float]:
    """Redis stops answering (SIGSTOP) for the block; it always resumes (SIGCONT) after."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        server.proc.send_signal(signal.SIGCONT)


async def http_get(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of a GET on 127.0.0.1, or None when it did not answer within 0.5 s."""
    try:
        async with asyncio.timeout(0.5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@contextlib.asynccontextmanager
async def polling(port: int, path: str) -> AsyncIterator[list[tuple[float, int | None, str]]]:
    """(monotonic time, status, body) of `path` every 0.1 s while the block runs."""
    seen: list[tuple[float, int | None, str]] = []

    async def poll() -> None:
        while True:
            got = await http_get(port, path)
            seen.append((time.monotonic(), *(got or (None, ""))))
            await asyncio.sleep(0.1)

    async with running(poll()):
        yield seen


@contextlib.asynccontextmanager
async def recording(ws: ClientConnection) -> AsyncIterator[list[tuple[float, dict[str, Any]]]]:
    """Every frame the client gets while the block runs, with when it arrived."""
    frames: list[tuple[float, dict[str, Any]]] = []

    async def read() -> None:
        async for raw in ws:
            frames.append((time.monotonic(), orjson.loads(raw)))

    async with running(read()):
        yield frames


def assert_every_discontinuity_announced(frames: list[dict[str, Any]]) -> int:
    """No duplicate, and every seq jump is preceded by a reset for its symbol; returns the resets."""
    last: dict[str, tuple[str, int]] = {}
    announced: set[str] = set()
    resets = 0
    for f in frames:
        if f.get("type") == "reset":
            announced.add(f["symbol"])
            resets += 1
        elif f.get("type") == "tick" and not f.get("snapshot"):
            sym, pos = f["symbol"], (f["epoch"], f["seq"])
            if sym in last and sym not in announced:
                assert pos[0] == last[sym][0], f"{sym}: epoch {last[sym][0]} → {pos[0]} without reset"
                assert pos[1] == last[sym][1] + 1, f"{sym}: seq {last[sym][1]} then {pos[1]}, no reset"
            announced.discard(sym)
            last[sym] = pos
    return resets


async def test_a_claim_whose_reply_was_lost_in_a_hang_is_adopted_by_the_next_claim(
        redis_url: str, redis_server: RedisServer) -> None:
    names = Names()
    a = RedisLeadership(lease_client(redis_url, ttl=0.6), names, "a", ttl=3.0, owns_client=True)
    b = RedisLeadership.from_url(redis_url, names, "b", ttl=3.0)
    check = Redis.from_url(redis_url)
    assert await b.claim() is not None  # loads the claim script into Redis
    await b.release()
    await a._client.ping()  # a's connection is up before Redis stops, as a standby's would be
    with hung(redis_server):
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await a.claim()  # sent, then no reply within the lease client's 0.2 s
        gave_up = time.monotonic() - started
    answered = time.monotonic()
    held = None
    while held is None and time.monotonic() - answered < 2:
        held = await check.get(names.leader)  # the claim runs once Redis resumes; its reply is lost
    assert held is not None and held.decode().startswith(a.fence + ":"), held
    assert await b.claim() is None, "another process must not take a lease that a's lost claim won"
    token = await a.claim()
    adopted = time.monotonic() - answered
    assert token == held.decode(), "a's next claim must adopt the lease its lost claim took"
    assert await b.claim() is None
    assert gave_up < 0.5, f"a hung claim held the caller {gave_up:.2f}s (socket timeout 0.2 s)"
    assert adopted < 1.0, f"adopted {adopted:.2f}s after Redis answered again"
    for lease in (a, b):
        await lease.close()
    await check.aclose()


def ingestor(cluster: Cluster, node: str, ttl: str) -> tuple[Proc, int]:
    port = free_port()
    return cluster.ingestor(FXPROXY_NODE_ID=node, FXPROXY_LEADER_TTL=ttl,
                            FXPROXY_METRICS_PORT=str(port)), port


def leader_of(cluster: Cluster, timeout: float = 10) -> str:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = client.get("fx:leader")
            if held:
                return held.decode().split(".")[0]
            time.sleep(0.05)
        raise TimeoutError("nobody took the lease")
    finally:
        client.close()


@pytest.mark.slow
async def test_a_redis_hang_longer_than_the_ttl_costs_at_most_one_ttl_after_redis_answers(
        cluster: Cluster, redis_server: RedisServer) -> None:
    ttl, hang = 1.0, 6.0
    cluster.simfeed(rate=20)
    nodes = {node: ingestor(cluster, node, str(ttl)) for node in ("a", "b")}
    _, edge_port = cluster.edge()
    leader = leader_of(cluster)
    wait_http(f"http://127.0.0.1:{nodes[leader][1]}/readyz", timeout=10)
    async with await open_native(edge_port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"]})
        async with recording(ws) as frames, polling(nodes[leader][1], "/readyz") as ready:
            await asyncio.sleep(1.0)
            with hung(redis_server) as stopped:
                await asyncio.sleep(hang)
            answered, answered_wall_ms = time.monotonic(), time.time() * 1000
            while time.monotonic() - answered < ttl + 5:
                fresh = [t for t, f in frames if f.get("type") == "tick" and t > answered
                         and int(f["ts"]) > answered_wall_ms]  # priced by the vendor after the hang
                if len(fresh) >= 10:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
    assert len(fresh) >= 10, f"ticks did not flow again within {ttl + 5:g}s of Redis answering"
    took = fresh[0] - answered
    first_503 = next((t for t, status, _ in ready if stopped <= t <= answered and status == 503), None)
    assert first_503 is not None, "the leader's /readyz stayed 200 while Redis hung"
    turned = first_503 - stopped
    resets = assert_every_discontinuity_announced([f for _, f in frames])
    print(f"\nRedis hung {hang:g}s, ttl {ttl:g}s: ticks again {took:.2f}s after Redis answered, "
          f"/readyz 503 {turned:.2f}s into the hang, resets {resets}, new leader {leader_of(cluster)}")
    assert took < ttl + 2, f"ticks flowed again {took:.2f}s after Redis answered (bound ttl + 2 s)"
    assert turned < 2.0, f"/readyz turned 503 {turned:.2f}s into the hang (bound 2 s)"
    assert nodes["a"][0].alive() and nodes["b"][0].alive()


async def test_ingestor_readyz_and_bus_gauge_turn_down_within_2s_of_a_hang_shorter_than_the_ttl(
        cluster: Cluster, redis_server: RedisServer) -> None:
    ttl, hang = 6.0, 3.0
    cluster.simfeed(rate=20)
    proc, port = ingestor(cluster, "solo", str(ttl))
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=10)
    token = redis.Redis.from_url(cluster.redis_url).get("fx:leader")
    async with polling(port, "/readyz") as ready, polling(port, "/metrics") as metrics:
        await asyncio.sleep(0.5)
        with hung(redis_server) as stopped:
            await asyncio.sleep(hang)
        answered = time.monotonic()
        await asyncio.sleep(2.5)
    down = next((t for t, status, _ in ready if t >= stopped and status == 503), None)
    gauge_down = next((t for t, _, body in metrics
                       if t >= stopped and "fxproxy_ingestor_bus_up 0.0" in body), None)
    up_again = next((t for t, status, _ in ready if t >= answered and status == 200), None)
    assert down is not None and gauge_down is not None, "readiness missed a hang shorter than the TTL"
    print(f"\n/readyz 503 after {down - stopped:.2f}s, bus_up 0 after {gauge_down - stopped:.2f}s, "
          f"200 again {(up_again or answered + 99) - answered:.2f}s after Redis answered")
    # the probe pings every 0.5 s with a 1.5 s deadline: 2 s at worst, plus our 0.1 s polling
    assert down - stopped < 2.3, f"/readyz turned 503 {down - stopped:.2f}s into the hang (bound 2.3 s)"
    assert gauge_down - stopped < 2.3
    assert up_again is not None and up_again - answered < 1.5, "not ready again after Redis answered"
    assert redis.Redis.from_url(cluster.redis_url).get("fx:leader") == token, \
        "a hang shorter than the TTL must not cost the leader its term"
    assert "lost leadership" not in proc.log
