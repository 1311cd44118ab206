"""FXPROXY_REDIS_URL parsing in its three modes, and the Redis names of each mode."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from ingestor.publisher import PARTIAL_RETRY, Publisher
from ingestor.sequencer import Sequencer
from shared.bus import Message, PartlyPublished
from shared.cluster_bus import ClusterBus, term_of
from shared.names import Names
from shared.redis_url import RedisTarget, connect, parse_redis_url
from shared.tick import Quote


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", RedisTarget("single", "redis://127.0.0.1:6379/0")),
    ("rediss://h:6380", RedisTarget("single", "rediss://h:6380", tls=True)),
    ("redis+cluster://a:7000,b:7001", RedisTarget(
        "cluster", "redis+cluster://a:7000,b:7001", (("a", 7000), ("b", 7001)))),
    ("rediss+cluster://u:p%40ss@a:7000/0", RedisTarget(
        "cluster", "rediss+cluster://u:p%40ss@a:7000/0", (("a", 7000),), username="u",
        password="p@ss", tls=True)),
    ("redis+cluster://a", RedisTarget("cluster", "redis+cluster://a", (("a", 6379),))),
    ("redis+sentinel://s1:26379,s2,[::1]:26380/mymaster", RedisTarget(
        "sentinel", "redis+sentinel://s1:26379,s2,[::1]:26380/mymaster",
        (("s1", 26379), ("s2", 26379), ("::1", 26380)), master="mymaster")),
    ("redis+sentinel://:secret@s1:26379/mymaster/3", RedisTarget(
        "sentinel", "redis+sentinel://:secret@s1:26379/mymaster/3", (("s1", 26379),),
        master="mymaster", db=3, password="secret")),
])
def test_good_urls_parse_to_their_mode(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:6379", "use redis://"),
    ("127.0.0.1:6379", "use redis://"),
    ("redis+cluster://a:notaport", "bad port"),
    ("redis+cluster://a:70000", "bad port"),
    ("redis+cluster://a:7000,,b:7001", "is not host:port"),
    ("redis+cluster://a:7000/2", "only database 0"),
    ("redis+sentinel://s1:26379", "name the Sentinel master"),
    ("redis+sentinel://s1:26379/m/x", "/DB (a number)"),
    ("redis+sentinel://u:hunter2@s1:26379", "name the Sentinel master"),
    ("redis+sentinel://s1:26379?password=hunter2", "name the Sentinel master"),
])
def test_bad_urls_fail_in_one_line_that_says_why(url: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    message = str(info.value)
    assert "\n" not in message and says in message
    assert "hunter2" not in message  # a password never reaches a log line


def test_a_parsed_target_does_not_show_its_password() -> None:
    target = parse_redis_url("redis+cluster://u:hunter2@a:7000,b:7001")
    assert target.password == "hunter2" and "hunter2" not in repr(target)


async def test_each_mode_gets_its_own_client_class() -> None:
    single = connect("redis://127.0.0.1:1/0", retries=0, socket_timeout=1)
    cluster = connect("redis+cluster://127.0.0.1:1", retries=0, socket_timeout=1)
    sentinel = connect("redis+sentinel://127.0.0.1:1/m", retries=0, socket_timeout=1)
    assert type(single) is Redis and isinstance(cluster, RedisCluster) and isinstance(sentinel, Redis)
    assert type(sentinel.connection_pool).__name__ == "SentinelConnectionPool"
    assert single.get_retry() is not None and single.get_retry().get_retries() == 0
    for client in (single, cluster, sentinel):
        await client.aclose()


async def test_an_unreachable_cluster_is_a_redis_error_like_any_outage() -> None:
    # redis-py raises RedisClusterException (not a RedisError) when no node answers; every
    # `except RedisError` that rides out an outage must see this one too.
    client = connect("redis+cluster://127.0.0.1:1", retries=0, socket_timeout=1, connect_timeout=1)
    with pytest.raises(RedisError):
        await client.ping()
    pipe = client.pipeline(transaction=False)
    pipe.get("fx:{EURUSD}:last")
    with pytest.raises(RedisError):
        await pipe.execute()
    await client.aclose()


def test_single_mode_keeps_todays_names() -> None:
    n = Names()
    assert (n.tick_channel("EURUSD"), n.last, n.history("EURUSD")) == \
        ("fx:tick:EURUSD", "fx:last", "fx:hist:EURUSD")
    assert (n.key_record("h"), n.key_names, n.connections("h"), n.control, n.edges, n.leader,
            n.epoch) == ("fx:key:h", "fx:keynames", "fx:conns:h", "fx:ctl", "fx:edges",
                         "fx:leader", "fx:epoch")
    assert n.meta("demand:edge1") == "fx:demand:edge1"


def test_cluster_names_put_a_symbol_in_one_slot_and_everything_else_in_another() -> None:
    n = Names("p:", cluster=True)
    assert (n.tick_channel("EURUSD"), n.history("EURUSD"), n.last_value("EURUSD"),
            n.fence("EURUSD")) == ("p:{EURUSD}:tick", "p:{EURUSD}:hist", "p:{EURUSD}:last",
                                   "p:{EURUSD}:fence")
    symbol_slots = {key_slot(k.encode()) for k in (
        n.tick_channel("EURUSD"), n.history("EURUSD"), n.last_value("EURUSD"), n.fence("EURUSD"))}
    meta = [n.key_record("h"), n.key_names, n.connections("h"), n.control, n.edges, n.leader,
            n.epoch, n.meta("demand:edge1")]
    assert all(name.startswith("p:{meta}:") for name in meta)
    meta_slots = {key_slot(k.encode()) for k in meta}
    assert len(symbol_slots) == 1 and len(meta_slots) == 1 and symbol_slots != meta_slots


async def test_the_cluster_publish_client_gives_up_on_a_shard_within_a_second() -> None:
    # A batch waits for its slowest shard: a partitioned primary must not hold it for long.
    bus = ClusterBus("redis+cluster://127.0.0.1:1")
    kwargs = bus._publisher.nodes_manager.connection_kwargs
    assert kwargs["socket_timeout"] <= 1.0 and kwargs["socket_connect_timeout"] <= 1.0, kwargs
    await bus.close()


def test_term_of_a_lease_token() -> None:
    assert term_of("node-a.1f2e:17.abcd") == 17
    assert term_of("") == 0 and term_of("node-a.1f2e:x.y") == 0


class _HalfAway:
    """A bus whose shard holding ODD symbols is away for the first `outages` publishes."""

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.calls: list[list[Message]] = []
        self.stored: list[Message] = []

    async def publish(self, messages: Sequence[Message], fence: str = "") -> None:
        self.calls.append(list(messages))
        if self.outages > 0:
            self.outages -= 1
            self.stored += [m for m in messages if m.symbol != "ODD"]
            raise PartlyPublished([m for m in messages if m.symbol == "ODD"], ConnectionError("away"))
        self.stored += messages


async def test_publisher_retries_only_what_a_shard_that_is_away_did_not_take() -> None:
    bus = _HalfAway(outages=3)
    publisher = Publisher(bus)  # type: ignore[arg-type]
    running = asyncio.create_task(publisher.run())
    seqs = Sequencer()
    for i in range(10):
        for symbol in ("EVEN", "ODD"):
            publisher.put(seqs.number(Quote(symbol, 1.0, 1.1, 1.05, 1732186000000 + i)))
    started = asyncio.get_running_loop().time()
    assert await publisher.flush(5)
    took = asyncio.get_running_loop().time() - started
    running.cancel()
    # Each tick stored once, in order per symbol; the live shard's were never sent twice.
    for symbol in ("EVEN", "ODD"):
        assert [m.seq for m in bus.stored if m.symbol == symbol] == list(range(1, 11))
    sent_even = [m.seq for call in bus.calls for m in call if m.symbol == "EVEN"]
    assert sorted(sent_even) == list(range(1, 11))
    assert len(bus.calls) == 4 and took < 3 * PARTIAL_RETRY + 1.0, (len(bus.calls), took)


class _OneShard:
    """A cluster publishing client with every symbol on one shard, where the scripts of the
    symbols in `failing` fail (a slot moving, a demoted primary's READONLY) and the rest run."""

    class _Node:
        name = "127.0.0.1:7000"

    class _NodesManager:
        async def initialize(self) -> None:
            return None

    def __init__(self, failing: set[str]) -> None:
        self.failing = failing
        self.ran: list[tuple[str, int]] = []  # (symbol, seq) of every tick a script took
        self.nodes_manager = self._NodesManager()

    async def initialize(self) -> None:
        return None

    def get_node_from_key(self, key: str) -> _OneShard._Node:
        return self._Node()

    def pipeline(self, transaction: bool) -> _OneShard:
        self._queued: list[tuple[str, list[int]]] = []
        return self

    def eval(self, script: str, numkeys: int, *args: str | int | bytes) -> None:
        symbol = str(args[0]).partition("{")[2].partition("}")[0]
        self._queued.append((symbol, [int(a) for a in args[numkeys + 5::2]]))

    async def execute(self, raise_on_error: bool = True) -> list[int | Exception]:
        results: list[int | Exception] = []
        for symbol, seqs in self._queued:
            if symbol in self.failing:
                results.append(RedisError(f"READONLY for {symbol}"))
            else:
                self.ran += ((symbol, s) for s in seqs)
                results.append(0)
        errors = [r for r in results if isinstance(r, Exception)]
        if raise_on_error and errors:
            raise errors[0]
        return results

    async def aclose(self) -> None:
        return None


async def test_one_symbols_error_parks_that_symbol_not_its_shard_mates() -> None:
    bus = ClusterBus("redis+cluster://127.0.0.1:1")
    shard = _OneShard(failing={"GBPUSD"})
    bus._publisher = shard  # type: ignore[assignment]
    batch = [Message(s, seq, b"{}") for seq in (1, 2) for s in ("EURUSD", "GBPUSD", "USDJPY")]
    with pytest.raises(PartlyPublished) as info:
        await bus.publish(batch)
    assert [(m.symbol, m.seq) for m in info.value.unpublished] == [("GBPUSD", 1), ("GBPUSD", 2)]
    shard.failing.clear()  # the retry: what failed, and fresh ticks
    await bus.publish([*info.value.unpublished, Message("EURUSD", 3, b"{}")])
    await bus.close()
    # Every tick ran once: EURUSD and USDJPY were not sent again with GBPUSD's retry.
    assert sorted(shard.ran) == sorted([(s, n) for s in ("EURUSD", "GBPUSD", "USDJPY") for n in (1, 2)]
                                       + [("EURUSD", 3)])
