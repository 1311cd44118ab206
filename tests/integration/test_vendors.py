"""Vendor limits and the kabuステーション dialect with real processes: simulators, ingestor,
redis-server, edge. Ticks are read where clients get them (an edge) or off the bus."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from tests.conftest import API_KEY, UPSTREAM_KEY, Cluster
from tests.support.client import assert_no_gaps, open_native, send_json, until
from tests.support.ports import free_port
from tests.support.procs import Proc, metric, wait_http, wait_port

pytestmark = pytest.mark.integration

FOREX = "EURUSD,GBPUSD,USDJPY,AUDUSD,USDCAD,USDCHF,NZDUSD"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def kabu_sim(cluster: Cluster, port: int = 0, *extra: str) -> tuple[Proc, int]:
    port = port or free_port()
    proc = cluster.start("simfeed", "--dialect", "kabu", "--port", str(port), "--key", UPSTREAM_KEY,
                         "--rate", "20", *extra)
    wait_http(f"http://127.0.0.1:{port}/_sim/status")
    return proc, port


def kabu_ingestor(cluster: Cluster, symbols: str, *ports: int, **env: str) -> tuple[Proc, int]:
    metrics_port = free_port()
    proc = cluster.ingestor(symbols, FXPROXY_UPSTREAM_DIALECT="kabu",
                            FXPROXY_UPSTREAM_URLS=",".join(f"http://127.0.0.1:{p}/kabusapi" for p in ports),
                            FXPROXY_METRICS_PORT=str(metrics_port), **env)
    return proc, metrics_port


@contextlib.asynccontextmanager
async def bus_ticks(redis_url: str) -> AsyncIterator[list[tuple[float, dict[str, Any]]]]:
    """Every tick published while inside, with the monotonic time it arrived."""
    got: list[tuple[float, dict[str, Any]]] = []
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("fx:tick:*")

    async def read() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "pmessage":
                got.append((time.monotonic(), orjson.loads(msg["data"])))

    reader = asyncio.create_task(read())
    try:
        yield got
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await pubsub.aclose()
        await client.aclose()


async def wait_for(pred: Any, timeout: float, what: str) -> float:
    """Seconds until `pred()` holds; fails after `timeout`."""
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def max_gap(ticks: list[tuple[float, dict[str, Any]]], symbols: set[str], start: float, end: float) -> float:
    """The longest pause between ticks of `symbols` within [start, end]."""
    times = [start] + [t for t, tick in ticks if tick["symbol"] in symbols and start <= t <= end] + [end]
    return max(b - a for a, b in itertools.pairwise(times))


def seq_gaps(ticks: list[tuple[float, dict[str, Any]]]) -> int:
    """Ticks that did not follow their symbol's previous one by exactly one seq (or changed epoch)."""
    last: dict[str, tuple[str, int]] = {}
    gaps = 0
    for _, tick in ticks:
        prev = last.get(tick["symbol"])
        if prev is not None and (tick["epoch"], tick["seq"]) != (prev[0], prev[1] + 1):
            gaps += 1
        last[tick["symbol"]] = (tick["epoch"], tick["seq"])
    return gaps


async def test_more_symbols_than_one_session_allows_spread_over_two_and_the_excess_is_refused(
        cluster: Cluster) -> None:
    feed_port = free_port()
    cluster.feed_port = feed_port
    cluster.start("simfeed", "--port", str(feed_port), "--key", UPSTREAM_KEY, "--rate", "10",
                  "--max-symbols", "3", "--max-connections", "2")
    wait_port(feed_port)
    metrics_port = free_port()
    ingestor = cluster.ingestor(FOREX, FXPROXY_UPSTREAM_MAX_SYMBOLS="3", FXPROXY_UPSTREAM_MAX_CONNECTIONS="2",
                                FXPROXY_METRICS_PORT=str(metrics_port))
    sessions_url = f"http://127.0.0.1:{feed_port}/sessions"
    async with bus_ticks(cluster.redis_url) as ticks:
        took = await wait_for(lambda: len(get_json(sessions_url)) == 2
                              and len({t["symbol"] for _, t in ticks}) == 6, 15, "two sessions streaming")
        await asyncio.sleep(1)
    sessions = get_json(sessions_url)
    print(f"\ntwo vendor sessions streaming after {took:.2f}s: {[s['symbols'] for s in sessions]}")
    assert sorted(len(s["symbols"]) for s in sessions) == [3, 3]
    # Static symbols in their configured order: the seventh is the one without room.
    assert {sym for s in sessions for sym in s["symbols"]} == set(FOREX.split(",")[:6])
    assert {t["symbol"] for _, t in ticks} == set(FOREX.split(",")[:6])
    assert seq_gaps(ticks) == 0
    wait_http(f"http://127.0.0.1:{metrics_port}/readyz")
    assert metric(metrics_port, "fxproxy_ingestor_upstream_symbols") == 6
    refused = [json.loads(line) for line in ingestor.log.splitlines()
               if '"upstream refused a symbol"' in line]
    assert {(r["symbol"], r.get("status")) for r in refused if r.get("status") == "capacity"} == {
        ("NZDUSD", "capacity")}


@pytest.mark.slow
async def test_one_failing_session_affects_only_its_own_symbols(cluster: Cluster) -> None:
    feed_port = free_port()
    cluster.feed_port = feed_port
    cluster.start("simfeed", "--port", str(feed_port), "--key", UPSTREAM_KEY, "--rate", "10",
                  "--max-symbols", "2", "--max-connections", "2")
    wait_port(feed_port)
    cluster.ingestor("EURUSD,GBPUSD,USDJPY,AUDUSD", FXPROXY_UPSTREAM_MAX_SYMBOLS="2",
                     FXPROXY_UPSTREAM_MAX_CONNECTIONS="2", FXPROXY_SILENCE_TIMEOUT="1.5")
    sessions_url = f"http://127.0.0.1:{feed_port}/sessions"
    async with bus_ticks(cluster.redis_url) as ticks:
        await wait_for(lambda: len({t["symbol"] for _, t in ticks}) == 4, 15, "four symbols streaming")
        failing = set(next(s["symbols"] for s in get_json(sessions_url) if "EURUSD" in s["symbols"]))
        others = {"EURUSD", "GBPUSD", "USDJPY", "AUDUSD"} - failing
        stalled_at = time.monotonic()
        get_json(f"http://127.0.0.1:{feed_port}/stall?symbol=EURUSD")
        recovered = await wait_for(
            lambda: any(t > stalled_at + 1.0 and tick["symbol"] in failing for t, tick in ticks), 15,
            "the stalled session's symbols back")
        await asyncio.sleep(1)
        end = time.monotonic()
    others_gap = max_gap(ticks, others, stalled_at, end)
    failing_gap = max_gap(ticks, failing, stalled_at, end)
    print(f"\nstalled session {sorted(failing)}: back after {recovered:.2f}s (pause {failing_gap:.2f}s); "
          f"the other session {sorted(others)}: longest pause {others_gap:.2f}s")
    assert 1.0 < failing_gap < 6.0  # silence timeout 1.5 s, then a re-login
    assert others_gap < 1.0, "the healthy session's symbols paused while the other one failed"
    assert seq_gaps(ticks) == 0


async def test_kabu_end_to_end_through_an_edge_in_both_client_dialects(cluster: Cluster) -> None:
    _, sim_port = kabu_sim(cluster)
    kabu_ingestor(cluster, "9433@1,7203@1,1234@1", sim_port)
    _, port = cluster.edge()
    await wait_for(lambda: "9433@1" in get_json(f"http://127.0.0.1:{sim_port}/_sim/status")["registered"],
                   15, "9433@1 registered")
    await asyncio.sleep(0.5)
    async with await open_native(port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["9433@1", "7203@1"], "id": 1})
        reply = await until(ws, lambda m: m.get("type") in ("subscribed", "error"), timeout=10)
        assert reply["type"] == "subscribed", reply
        native = []
        async with asyncio.timeout(10):
            while len(native) < 20:
                msg = await until(ws, lambda m: m.get("type") == "tick")
                if not msg.get("snapshot"):
                    native.append(msg)
    assert {t["symbol"] for t in native} == {"9433@1", "7203@1"}
    # One tick apart, bid below ask: BidPrice (the best sell quote) became our ask.
    assert all(0 < t["ask"] - t["bid"] <= 5 and t["mid"] == (t["bid"] + t["ask"]) / 2 for t in native)
    assert_no_gaps(native)
    async with connect(f"ws://127.0.0.1:{port}/feedadv", open_timeout=5) as tm:
        assert await asyncio.wait_for(tm.recv(), 5) == "Connected"
        await tm.send(orjson.dumps({"userKey": API_KEY, "symbol": "9433@1"}).decode())
        feedadv = [orjson.loads(await asyncio.wait_for(tm.recv(), 5)) for _ in range(5)]
    for tick in feedadv:
        assert set(tick) == {"symbol", "ts", "bid", "ask", "mid"} and tick["symbol"] == "9433@1"
        assert tick["bid"] < tick["ask"] and tick["ts"].isdigit()
    status = get_json(f"http://127.0.0.1:{sim_port}/_sim/status")
    assert sorted(status["registered"]) == ["7203@1", "9433@1"]  # 1234@1 is not in its catalogue


@pytest.mark.slow
async def test_kabu_token_expiry_mid_stream_resumes_with_seq_contiguous(cluster: Cluster) -> None:
    _, sim_port = kabu_sim(cluster, 0, "--token-ttl", "2.5")
    kabu_ingestor(cluster, "9433@1,7203@1", sim_port)
    status_url = f"http://127.0.0.1:{sim_port}/_sim/status"
    async with bus_ticks(cluster.redis_url) as ticks:
        await wait_for(lambda: len({t["symbol"] for _, t in ticks}) == 2, 15, "both symbols streaming")
        start = time.monotonic()
        await wait_for(lambda: get_json(status_url)["logouts"] >= 3, 20, "three forced logouts")
        await asyncio.sleep(1)
        end = time.monotonic()
    status = get_json(status_url)
    pause = max_gap(ticks, {"9433@1", "7203@1"}, start, end)
    gaps = seq_gaps(ticks)
    print(f"\n{status['logouts']} token expiries, {status['tokens_issued']} tokens: longest pause "
          f"{pause:.2f}s, {len(ticks)} ticks, seq gaps {gaps}")
    assert status["tokens_issued"] >= status["logouts"] + 1
    assert gaps == 0
    assert pause < 3.0
    assert len({t["epoch"] for _, t in ticks}) == 2  # one epoch per symbol: no reset


@pytest.mark.slow
async def test_kabu_station_down_affects_only_its_symbols_and_resumes_after_restart(
        cluster: Cluster) -> None:
    _, a_port = kabu_sim(cluster)
    b, b_port = kabu_sim(cluster)
    kabu_ingestor(cluster, "9433@1,7203@1,6758@1,9984@1", a_port, b_port,
                  FXPROXY_UPSTREAM_MAX_SYMBOLS="2", FXPROXY_UPSTREAM_MAX_CONNECTIONS="2")
    async with bus_ticks(cluster.redis_url) as ticks:
        await wait_for(lambda: len({t["symbol"] for _, t in ticks}) == 4, 15, "four symbols streaming")
        on_a = set(get_json(f"http://127.0.0.1:{a_port}/_sim/status")["registered"])
        on_b = set(get_json(f"http://127.0.0.1:{b_port}/_sim/status")["registered"])
        assert len(on_a) == len(on_b) == 2 and on_a | on_b == {"9433@1", "7203@1", "6758@1", "9984@1"}
        b.kill()
        killed = time.monotonic()
        await asyncio.sleep(2)
        b, _ = await asyncio.to_thread(kabu_sim, cluster, b_port)  # the vendor application restarts
        restarted = time.monotonic()
        back = await wait_for(lambda: any(t > restarted and tick["symbol"] in on_b for t, tick in ticks),
                              15, "station B's symbols back")
        await asyncio.sleep(1)
        end = time.monotonic()
    a_gap = max_gap(ticks, on_a, killed, end)
    print(f"\nstation B down {restarted - killed:.2f}s, its symbols back {back:.2f}s after its restart; "
          f"station A's symbols: longest pause {a_gap:.2f}s")
    assert a_gap < 1.0
    assert back < 5.0
    assert seq_gaps(ticks) == 0
