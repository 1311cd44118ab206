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


def message(seq: int, epoch: str = "e1") -> Message:
    return Message("EURUSD", seq, encode_tick(Tick("EURUSD", 1.1, 1.2, 1.15, 1, epoch, seq)))


async def test_one_leader_at_a_time_and_a_stale_leader_is_fenced(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url)
    a = RedisLeadership.from_url(redis_url, bus.names, "a", ttl=0.3)
    b = RedisLeadership.from_url(redis_url, bus.names, "b", ttl=0.3)
    token_a = await a.claim()
    assert token_a is not None and token_a.startswith(a.fence + ":") and a.fence.startswith("a.")
    assert await b.claim() is None
    await bus.publish([message(1)], fence=a.fence)
    await asyncio.sleep(0.5)  # a stalls (GC pause, partition) and its lease runs out
    token_b = await b.claim()
    assert token_b is not None and token_b.startswith(b.fence + ":")
    assert int(token_b.split(":")[1].split(".")[0]) > int(token_a.split(":")[1].split(".")[0])
    with pytest.raises(Fenced):
        await bus.publish([message(2)], fence=a.fence)  # a wakes up and tries its late batch
    assert await a.claim() is None
    assert await bus.client.xlen("fx:hist:EURUSD") == 1  # nothing of the late batch landed
    for lease in (a, b):
        await lease.close()
    await bus.close()


async def test_leader_retakes_its_lease_after_redis_lost_it_under_a_new_token(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url)
    a = RedisLeadership.from_url(redis_url, Names(), "a", ttl=5)
    b = RedisLeadership.from_url(redis_url, Names(), "b", ttl=5)
    token = await a.claim()
    assert token is not None
    await bus.client.flushall()  # Redis restarted without persistence: fx:epoch counts from 1 again
    await bus.publish([message(1)], fence=a.fence)  # an empty lease fences nobody
    again = await a.claim()
    assert again is not None and again.startswith(a.fence + ":")
    assert again.split(".")[-2].endswith(":1") and token.split(".")[-2].endswith(":1")  # same epoch 1
    assert again != token, "a new term must have a token of its own even when fx:epoch was lost"
    assert (await bus.client.get("fx:leader")).decode() == again
    assert await b.claim() is None  # and the standby still stands by
    for lease in (a, b):
        await lease.close()
    await bus.close()


async def test_our_retaken_lease_never_fences_our_publisher_but_another_process_does(
        redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url)
    names = Names()
    a = RedisLeadership.from_url(redis_url, names, "a", ttl=5)
    twin = RedisLeadership.from_url(redis_url, names, "a", ttl=5)  # same node id, another process
    assert twin.fence != a.fence
    first = await a.claim()
    await bus.publish([message(1)], fence=a.fence)
    await bus.client.delete("fx:leader")  # lost with a Redis restart, or expired during a hang
    second = await a.claim()
    assert first is not None and second is not None and second != first
    await bus.publish([message(2)], fence=a.fence)  # our new term: not fenced
    assert await twin.claim() is None  # the lease under its new term is still a's
    await a.release()
    await bus.publish([message(3)], fence=a.fence)  # an absent lease fences nobody
    assert await twin.claim() is not None
    with pytest.raises(Fenced):
        await bus.publish([message(4)], fence=a.fence)
    assert await bus.client.xlen("fx:hist:EURUSD") == 3
    for lease in (a, twin):
        await lease.close()
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
    print(f"\nleader killed: ticks again after {took:.2f}s (ttl 1 s)")
    # the lease runs out within ttl, the standby polls every ttl/3, then logs in upstream
    assert took < 1 + 1 / 3 + 1.5, f"failover took {took:.2f}s (bound ttl + ttl/3 + 1.5 s for login)"
    assert_no_gaps(before + after)  # the new leader continues seq from fx:last
    logins = feed.log[len(feed_log_before):].count("client logged in")
    assert logins == 2  # the leader, then the standby after it died: never both at once
    assert "standing by" in ingestors[standby].log


async def test_a_replayed_batch_never_moves_last_back_nor_wipes_history(redis_url: str) -> None:
    from shared.tick import position_of

    bus = RedisBus.from_url(redis_url)

    def msg(seq: int) -> Message:
        return Message("EURUSD", seq, encode_tick(Tick("EURUSD", 1.1, 1.2, 1.15, 1, "e1", seq)))

    await bus.publish([msg(1), msg(2), msg(3)])
    await bus.publish([msg(1), msg(2)])  # a late leader's stale queue, with no lease held
    last = await bus.last(["EURUSD"])
    assert position_of(last["EURUSD"]).seq == 3
    assert [position_of(p).seq for p in await bus.history("EURUSD", 0, 10)] == [1, 2, 3]
    await bus.close()
