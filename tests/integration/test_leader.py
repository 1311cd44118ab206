"""Leader election: one ingestor talks to the vendor, a standby takes over, a stale one is fenced."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from ingestor.leader import RedisLeadership
from shared.bus import Fenced, Message
from shared.names import Names
from shared.redis_bus import RedisBus
from shared.tick import Tick, encode_tick
from tests.conftest import API_KEY, Cluster
from tests.support.client import assert_no_gaps, live_ticks, open_native, send_json

pytestmark = pytest.mark.integration


def message(seq: int) -> Message:
    return Message("EURUSD", seq, encode_tick(Tick("EURUSD", 1.1, 1.2, 1.15, 1, seq)))


async def test_one_leader_at_a_time_and_a_stale_leader_is_fenced(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url)
    a = RedisLeadership(bus.client, bus.names, "a", ttl=0.3)
    b = RedisLeadership(bus.client, bus.names, "b", ttl=0.3)
    token_a = await a.acquire()
    assert token_a is not None and token_a.startswith("a.")
    assert await b.acquire() is None
    await bus.publish([message(1)], fence=token_a)
    await asyncio.sleep(0.5)  # a stalls (GC pause, partition) and its lease runs out
    token_b = await b.acquire()
    assert token_b is not None and token_b.startswith("b.")
    assert int(token_b.split(":")[1]) > int(token_a.split(":")[1])
    with pytest.raises(Fenced):
        await bus.publish([message(2)], fence=token_a)  # a wakes up and tries its late batch
    assert await a.renew(token_a) is None
    assert await bus.client.xlen("fx:hist:EURUSD") == 1  # nothing of the late batch landed
    await bus.close()


async def test_leader_retakes_its_lease_after_redis_lost_it(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url)
    a = RedisLeadership(bus.client, Names(), "a", ttl=5)
    b = RedisLeadership(bus.client, Names(), "b", ttl=5)
    token = await a.acquire()
    assert token is not None
    await bus.client.flushall()  # Redis restarted without persistence
    await bus.publish([message(1)], fence=token)  # an empty lease fences nobody
    again = await a.renew(token)
    assert again is not None and again.startswith("a.")
    assert (await bus.client.get("fx:leader")).decode() == again
    assert await b.acquire() is None  # and the standby still stands by
    await bus.close()


async def test_standby_takes_over_the_vendor_connection_without_a_seq_gap(cluster: Cluster) -> None:
    feed = cluster.simfeed()
    feed_log_before = feed.log
    ingestors = {node: cluster.ingestor(FXPROXY_NODE_ID=node, FXPROXY_LEADER_TTL="1")
                 for node in ("a", "b")}
    _, port = cluster.edge()
    await asyncio.sleep(1.5)
    client = redis.Redis.from_url(cluster.redis_url)
    leader = client.get("fx:leader").decode().split(".")[0]
    standby = "b" if leader == "a" else "a"
    async with await open_native(port, API_KEY) as ws:
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
        before = await live_ticks(ws, 10)
        ingestors[leader].kill()
        started = time.monotonic()
        after = await live_ticks(ws, 10, timeout=15)
        took = time.monotonic() - started
    new_leader = client.get("fx:leader").decode().split(".")[0]
    client.close()
    assert new_leader == standby
    assert took < 6, f"failover took {took:.1f}s"
    assert_no_gaps(before + after)  # the new leader continues seq from fx:last
    logins = feed.log[len(feed_log_before):].count("client logged in")
    assert logins == 2  # the leader, then the standby after it died: never both at once
    assert "standing by" in ingestors[standby].log
