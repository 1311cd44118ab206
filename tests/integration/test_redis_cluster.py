"""The whole pipeline on a real Redis Cluster (3 primaries + 3 replicas), through the CLI:
sharded pub/sub end to end, keys and slots in the {meta} slot, and a primary killed under load."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fxproxy.simfeed import PAIRS
from shared.bus import Message, PartlyPublished, TickHandler
from shared.cluster_bus import ClusterBus
from shared.cluster_subscriber import ClusterSubscriber
from shared.names import Names
from tests.conftest import API_KEY, Cluster, StartProc
from tests.integration.test_keys_cluster import create_key, keys_cli
from tests.support.bus_rig import BusRig, ReadyWatch, first_live_tick, store_ticks
from tests.support.client import (
    assert_no_gaps,
    closed_code,
    live_ticks,
    open_native,
    recv_json,
    send_json,
    until,
)
from tests.support.redis_cluster import RedisCluster, command
from tests.support.running import running

pytestmark = pytest.mark.integration

NAMES = Names(cluster=True)


def spread(cluster: RedisCluster, per_shard: int) -> dict[int, list[str]]:
    """`per_shard` simfeed symbols on each primary, by the slot of their tick channel."""
    by_owner: dict[int, list[str]] = {}
    for symbol in PAIRS:
        by_owner.setdefault(cluster.owner(NAMES.tick_channel(symbol)), []).append(symbol)
    assert len(by_owner) == 3, f"the simfeed's symbols cover only {len(by_owner)} shards"
    return {port: symbols[:per_shard] for port, symbols in by_owner.items()}


@pytest.mark.slow  # mostly waiting: runs with the parallel half
async def test_ticks_flow_over_all_three_shards_in_both_dialects(
        procs: StartProc, redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    shards = spread(redis_cluster, 1)
    symbols = [s for group in shards.values() for s in group]
    for symbol in symbols:  # channel, history and last value of a symbol share its slot
        slots = {redis_cluster.keyslot(k) for k in
                 (NAMES.tick_channel(symbol), NAMES.history(symbol), NAMES.last_value(symbol))}
        assert len(slots) == 1
    cluster = Cluster(procs, redis_cluster_url)
    cluster.simfeed(rate=20)
    cluster.ingestor(",".join(symbols))
    _, port = cluster.edge()
    async with await open_native(port, API_KEY) as ws:
        for _ in range(50):  # until the ingestor has published every symbol once
            await send_json(ws, {"op": "subscribe", "symbols": symbols, "id": 1})
            reply = await until(ws, lambda m: m.get("type") in ("subscribed", "error"), timeout=10)
            if reply["type"] == "subscribed":
                break
            await asyncio.sleep(0.2)
        assert reply["type"] == "subscribed" and reply["symbols"] == symbols
        ticks = await live_ticks(ws, 30)
    assert {t["symbol"] for t in ticks} == set(symbols)
    assert_no_gaps(ticks)
    async with connect(f"ws://127.0.0.1:{port}/feedadv", open_timeout=5) as tm:
        assert await asyncio.wait_for(tm.recv(), 5) == "Connected"
        await tm.send(orjson.dumps({"userKey": API_KEY, "symbol": ",".join(symbols)}).decode())
        got = [orjson.loads(await asyncio.wait_for(tm.recv(), 5)) for _ in range(15)]
    assert {t["symbol"] for t in got} == set(symbols)
    assert all(set(t) == {"symbol", "ts", "bid", "ask", "mid"} for t in got)
    owners = {redis_cluster.owner(NAMES.history(s)) for s in symbols}
    print(f"\nsymbols by shard: {shards}")
    assert len(owners) == 3


async def test_symbols_on_demand_work_on_a_cluster(
        procs: StartProc, redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    # Demand sets, the catalogue and statuses share the {meta} slot: SUNION runs on one shard.
    assert redis_cluster.keyslot(NAMES.demand("e1")) == redis_cluster.keyslot(NAMES.edges)
    cluster = Cluster(procs, redis_cluster_url)
    cluster.simfeed(rate=20)
    cluster.ingestor("EURUSD", FXPROXY_ON_DEMAND="XAU*", FXPROXY_DEMAND_GRACE="1")
    _, port = cluster.edge()
    async with await open_native(port, API_KEY) as ws:
        for _ in range(50):  # until the leader has written the catalogue and EURUSD ticked
            await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
            reply = await until(ws, lambda m: m.get("type") in ("subscribed", "error"), timeout=10)
            if reply["type"] == "subscribed":
                break
            await asyncio.sleep(0.2)
        started = time.monotonic()
        await send_json(ws, {"op": "subscribe", "symbols": ["XAUUSD"], "id": 2})
        reply = await until(ws, lambda m: m.get("type") == "subscribed" and m.get("id") == 2)
        assert reply["pending"] == ["XAUUSD"]
        first = await until(ws, lambda m: m.get("type") == "tick" and m["symbol"] == "XAUUSD", 10)
        took = time.monotonic() - started
        xau = [first] + [t for t in await live_ticks(ws, 20) if t["symbol"] == "XAUUSD"]
    print(f"\non a cluster: subscribe to an on-demand symbol -> first tick in {took:.2f}s")
    assert took < 3.0
    assert_no_gaps(xau)


async def test_keys_limits_and_revocation_work_on_a_cluster(
        procs: StartProc, redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    url = redis_cluster_url
    key = create_key(url, "carol", "--max-connections", "2")
    assert "carol" in keys_cli(url, "list").stdout
    cluster = Cluster(procs, url)
    _, port1 = cluster.edge(FXPROXY_HEARTBEAT_INTERVAL="0.3")
    _, port2 = cluster.edge(FXPROXY_HEARTBEAT_INTERVAL="0.3")
    conns = [await open_native(port1, key), await open_native(port2, key)]
    with pytest.raises(InvalidStatus) as info:  # the limit counts across both edges
        await open_native(port1, key)
    assert info.value.response.status_code == 429
    for ws in conns:
        await send_json(ws, {"op": "ping"})
        await recv_json(ws)
    # Keys, slots and edges live in one slot, the one the keystore's scripts need.
    meta = {redis_cluster.keyslot(k) for k in (NAMES.key_names, NAMES.edges, NAMES.connections("x"),
                                                NAMES.key_record("x"), NAMES.leader, NAMES.epoch)}
    assert len(meta) == 1
    assert keys_cli(url, "revoke", "carol").returncode == 0
    revoked_at = time.monotonic()
    codes = await asyncio.gather(*(closed_code(ws, 3) for ws in conns))
    took = time.monotonic() - revoked_at
    print(f"\nrevocation over the control channel closed both edges' connections in {took:.2f}s")
    assert codes == [4003, 4003]
    # Usually 0.00 s (closed before the CLI process has exited); on a loaded machine the close
    # handshake has been seen to take ~1.9 s on a single Redis too (test_keys_cluster.py).
    assert took < 3.0


def test_a_bad_cluster_url_fails_at_start_in_one_line(procs: StartProc) -> None:
    proc = procs("edge", env={"FXPROXY_REDIS_URL": "redis+cluster://127.0.0.1:notaport"})
    code = proc.proc.wait(15)
    lines = [line for line in proc.log.splitlines() if line.strip()]
    assert code == 2, proc.log
    assert len(lines) == 1 and "bad FXPROXY_REDIS_URL" in lines[0], proc.log


def quiet_symbol(cluster: RedisCluster, port: int) -> str:
    """A symbol nobody streams whose slot the primary on `port` owns (see BusRig.quiet)."""
    for i in range(200):
        symbol = f"QUIET{i:03d}"
        if cluster.owner(NAMES.tick_channel(symbol)) == port:
            return symbol
    raise LookupError(f"no quiet symbol on :{port}")


@pytest.mark.slow
@pytest.mark.parametrize("holds", ["symbols", "symbols+lease"])
async def test_primary_killed_under_load_its_replica_takes_over_without_silent_gaps(
        procs: StartProc, holds: str) -> None:
    own = RedisCluster(node_timeout_ms=1000)
    own.start()
    rig: BusRig | None = None
    ready: ReadyWatch | None = None
    try:
        meta_owner = own.owner(NAMES.leader)
        shards = spread(own, 3)
        # A primary holding subscribed symbols, with or without the lease's {meta} slot (then
        # the lease, key store and control channel move too).
        victim = meta_owner if holds == "symbols+lease" else next(p for p in shards if p != meta_owner)
        symbols = [s for group in shards.values() for s in group[:2]]
        others = [s for s in symbols if s not in shards[victim]]
        unwatched = next(group[2] for p, group in shards.items() if p != victim)
        # Ticks in history that pub/sub never delivered: only the edges' refill after their
        # resubscribe on the replica brings them, since the symbol never ticks again.
        quiet = quiet_symbol(own, victim)
        store_ticks(victim, NAMES, quiet, "q1", range(1, 6), replicas=1)
        rig = BusRig(Cluster(procs, own.url), symbols, quiet=[quiet], unwatched=[unwatched])
        await rig.start(rate=20)
        store_ticks(victim, NAMES, quiet, "q1", range(6, 9), replicas=1, last=False)
        ready = ReadyWatch([port for _, port in rig.edges])
        ready.start()
        fault_at = time.monotonic()
        own.kill(victim)
        await asyncio.sleep(0.3)
        # A symbol of a live shard that no client of this edge held yet: subscribed at once.
        subscribed = await first_live_tick(rig.edges[0][1], unwatched)
        failover = await asyncio.to_thread(own.wait_ok, 30)
        result = await rig.measure(fault_at)
        await ready.stop()
        quiet_at = rig.arrived(quiet, ("q1", 8)) - fault_at
        moved = own.owner(NAMES.tick_channel(shards[victim][0]))
        elsewhere = rig.pause(others, fault_at - 1.0)
        resets_elsewhere = rig.resets(others)
        print(f"\n{result.line(f'cluster primary kill -9 ({holds})')}; symbols of the other shards "
              f"paused at most {elsewhere:.2f}s, resets there {resets_elsewhere}; a new subscribe to "
              f"{unwatched} (live shard) got its first tick {subscribed:.2f}s later; quiet symbol's "
              f"unpublished ticks refilled {quiet_at:.2f}s after the fault; /readyz not 200 "
              f"{len(ready.failures)} times of {ready.polls} polls; cluster ok again after "
              f"{failover:.2f}s; {shards[victim][:2]} moved from :{victim} to :{moved}")
        assert moved != victim
        assert result.silent_gaps == 0 and result.duplicates == 0, result.findings
        assert result.flow < 15.0, result.findings
        assert quiet_at < 15.0, result.findings
        assert resets_elsewhere == 0, result.findings
        if holds == "symbols":
            # Only the lost shard's symbols wait for its failover; the others keep flowing (20
            # ticks/s each: a pause is normally 0.05 s; waiting for the failover would be ~4 s),
            # and so do new subscriptions to them (they used to wait for the failover too).
            assert elsewhere < 2.0, result.findings
            assert subscribed < 1.5
            # The {meta} node answers: no edge is pulled from the balancer for a shard's failover.
            assert ready.failures == [], ready.failures[:10]
        else:
            # Publishing waits for the lease's shard: ticks of any symbol only after its failover.
            assert subscribed < 15.0
    finally:
        if ready is not None:
            await ready.stop()
        if rig is not None:
            await rig.stop()
        own.close()


@pytest.mark.slow
async def test_a_hung_primary_is_noticed_and_its_symbols_follow_the_failover(procs: StartProc) -> None:
    """SIGSTOP of the primary owning subscribed symbols: its sockets stay open, so only the
    subscribers' own PINGs show it. Clients resume soon after its replica takes over, with no
    silent gap or duplicate and no reset (the data is replicated), and every edge stays ready.
    Then a coordinated CLUSTER FAILOVER of another shard: no reset either."""
    own = RedisCluster(node_timeout_ms=1000)
    own.start()
    rig: BusRig | None = None
    ready: ReadyWatch | None = None
    victim = 0
    try:
        meta_owner = own.owner(NAMES.leader)
        shards = spread(own, 2)
        victim = next(p for p in shards if p != meta_owner)
        third = next(p for p in shards if p not in (victim, meta_owner))
        symbols = [s for group in shards.values() for s in group]
        quiet = quiet_symbol(own, victim)
        store_ticks(victim, NAMES, quiet, "q1", range(1, 6), replicas=1)
        rig = BusRig(Cluster(procs, own.url), symbols, quiet=[quiet])
        await rig.start(rate=20)
        store_ticks(victim, NAMES, quiet, "q1", range(6, 9), replicas=1, last=False)
        ready = ReadyWatch([port for _, port in rig.edges])
        ready.start()
        fault_at = time.monotonic()
        own.freeze(victim)
        failover = await asyncio.to_thread(own.wait_ok, 30)
        hung = await rig.measure(fault_at, stop=False)
        quiet_at = rig.arrived(quiet, ("q1", 8)) - fault_at
        replica = own.replica_of(third)
        handover_at = time.monotonic()
        command(replica, "CLUSTER", "FAILOVER")
        handover = await asyncio.to_thread(own.wait_ok, 30)
        coordinated = await rig.measure(handover_at)
        await ready.stop()
        resets = rig.resets([*symbols, quiet], after=fault_at)
        print(f"\n{hung.line('cluster primary SIGSTOP')}; cluster ok again after {failover:.2f}s, "
              f"clients flowing {hung.flow - failover:.2f}s after that; quiet symbol's unpublished "
              f"ticks refilled {quiet_at:.2f}s after the fault; /readyz not 200 "
              f"{len(ready.failures)} times of {ready.polls} polls")
        print(coordinated.line(f"coordinated CLUSTER FAILOVER (ok after {handover:.2f}s)"))
        assert hung.silent_gaps == 0 and hung.duplicates == 0, hung.findings
        assert coordinated.silent_gaps == 0 and coordinated.duplicates == 0, coordinated.findings
        assert resets == 0, coordinated.findings
        # Before: the edge never noticed, and got nothing of the stopped shard's symbols for as
        # long as it stayed stopped (20 s measured) while reporting the bus up.
        assert hung.flow - failover < 4.0, hung.findings
        assert quiet_at < hung.flow + 2.0, hung.findings
        assert coordinated.flow < 5.0, coordinated.findings
        assert ready.failures == [], ready.failures[:10]
    finally:
        if ready is not None:
            await ready.stop()
        if rig is not None:
            await rig.stop()
        own.thaw(victim)
        own.close()


def _tick(symbol: str, seq: int) -> bytes:
    return b'{"symbol":"%s","epoch":"e","seq":%d}' % (symbol.encode(), seq)


@contextlib.asynccontextmanager
async def reading(url: str, symbols: list[str], on_tick: TickHandler,
                  ) -> AsyncIterator[tuple[ClusterBus, ClusterSubscriber, list[bool], list[str]]]:
    """Subscribe `symbols` on the cluster at `url` and read them until the block ends; yields
    the bus, the subscriber, its up/down states and the symbols it handed for a refill."""
    bus = ClusterBus(url)
    states: list[bool] = []
    resubscribed: list[str] = []
    subscriber = bus.subscriber(on_tick, lambda _e: None, states.append, resubscribed.extend)
    try:
        await subscriber.subscribe(symbols)
        async with running(subscriber.run()):
            yield bus, subscriber, states, resubscribed
    finally:
        await bus.close()


@pytest.mark.slow  # mostly waiting: runs with the parallel half
async def test_subscriber_resubscribes_when_the_server_ends_its_sharded_subscription(
        redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    """A manual CLUSTER FAILOVER turns the symbol's primary into a replica, which pushes
    `sunsubscribe`: the subscriber resubscribes that symbol alone on the new primary (reported for
    a history refill) and ticks flow; the bus is never down (the control channel's connection
    stays), and an unsubscribe of our own is not mistaken for a push."""
    symbols = [s for group in spread(redis_cluster, 1).values() for s in group]
    got: dict[str, int] = {s: 0 for s in symbols}
    seq = 0
    async with reading(redis_cluster_url, symbols, lambda s, _p: got.__setitem__(s, got[s] + 1)) as (
            bus, subscriber, states, resubscribed):

        async def publish_until(pred: Callable[[], bool], timeout: float) -> float:
            nonlocal seq
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout and not pred():
                seq += 1
                with contextlib.suppress(PartlyPublished):  # the failing-over shard, for a moment
                    await bus.publish([Message(s, seq, _tick(s, seq)) for s in symbols])
                await asyncio.sleep(0.02)
            return time.monotonic() - t0

        await publish_until(lambda: all(got.values()), 10)
        assert states == [True] and all(got.values())
        await subscriber.unsubscribe(symbols[2:])
        await publish_until(lambda: False, 0.3)
        assert states == [True] and resubscribed == [], "our own unsubscribe was taken for a loss"
        old = redis_cluster.owner(NAMES.tick_channel(symbols[0]))
        replica = redis_cluster.replica_of(old)
        command(replica, "CLUSTER", "FAILOVER")
        before = got[symbols[0]]
        took = await publish_until(lambda: resubscribed == [symbols[0]] and got[symbols[0]] > before + 5,
                                   20)
        print(f"\nmanual failover :{old} -> :{replica}: subscriber states {states}, resubscribed "
              f"{resubscribed}, ticks flowing again after {took:.2f}s")
        assert states == [True] and resubscribed == [symbols[0]] and got[symbols[0]] > before + 5
        assert took < 10.0
        assert redis_cluster.owner(NAMES.tick_channel(symbols[0])) == replica


async def test_a_symbol_toggled_fast_never_takes_the_bus_down(
        redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    """A client can unsubscribe and subscribe one symbol as fast as it likes: the replies to our
    own SUNSUBSCRIBEs are not pushes from the server (each one used to take the bus down: /readyz
    503, every symbol refilled, every key reloaded), and ticks keep flowing."""
    symbol = "EURUSD"
    got: list[bytes] = []
    async with reading(redis_cluster_url, [symbol], lambda _s, p: got.append(p)) as (
            bus, subscriber, states, resubscribed):
        for _ in range(100):
            if states:
                break
            await asyncio.sleep(0.05)
        for _ in range(50):  # as a client's frames drive the hub: no wait for Redis' replies
            await subscriber.unsubscribe([symbol])
            await subscriber.subscribe([symbol])
        await asyncio.sleep(0.2)  # the last SSUBSCRIBE in place before the ticks
        for seq in range(1, 21):
            await bus.publish([Message(symbol, seq, _tick(symbol, seq))])
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        cycles = states.count(False)
        print(f"\n{symbol} toggled 50 times: {cycles} bus down/up cycles, {len(resubscribed)} "
              f"refills, {len(got)} of 20 ticks after")
        assert cycles == 0 and states == [True], states
        assert resubscribed == []
        assert len(got) == 20


async def test_subscriber_follows_a_slot_migrated_to_another_primary(
        redis_cluster: RedisCluster, redis_cluster_url: str) -> None:
    """The slot of a subscribed symbol moves (CLUSTER SETSLOT ... MIGRATING/IMPORTING, MIGRATE,
    SETSLOT NODE): the old owner pushes `sunsubscribe`, the subscriber resubscribes on the new one,
    and the publisher follows MOVED."""
    symbol = "EURUSD"
    channel = NAMES.tick_channel(symbol)
    slot, src = redis_cluster.keyslot(channel), redis_cluster.owner(channel)
    dst = next(p for p in redis_cluster.primary_ports() if p != src)
    got: list[bytes] = []
    seq = 0
    async with reading(redis_cluster_url, [symbol], lambda _s, p: got.append(p)) as (
            bus, _, states, resubscribed):

        async def publish(n: int) -> None:
            nonlocal seq
            for _ in range(n):
                seq += 1
                await bus.publish([Message(symbol, seq, _tick(symbol, seq))])
                await asyncio.sleep(0.02)

        await publish(20)
        assert states == [True] and got, "no ticks before the move"
        src_id, dst_id = (command(p, "CLUSTER", "MYID").split("\r\n")[1] for p in (src, dst))
        command(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
        command(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
        reply = command(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS",
                        NAMES.history(symbol), NAMES.last_value(symbol))
        assert reply.startswith("+OK"), reply
        moved_at = time.monotonic()
        for port in redis_cluster.primary_ports():
            command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        before = len(got)
        for _ in range(200):
            await publish(1)
            if resubscribed and len(got) > before + 5:
                break
        took = time.monotonic() - moved_at
        print(f"\nslot {slot} of {symbol} moved :{src} -> :{dst}: subscriber states {states}, "
              f"resubscribed {resubscribed}, ticks flowing again after {took:.2f}s")
        assert states == [True] and resubscribed == [symbol] and len(got) > before + 5
        assert took < 10.0
        assert redis_cluster.owner(channel) == dst
        assert len(await bus.history(symbol, 0, 1000)) == seq  # history moved with the slot
