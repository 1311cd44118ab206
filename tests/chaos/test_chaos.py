"""Chaos: kill, freeze and restart real processes under clients that account for every tick.

Each scenario runs redis-server, simfeed (one vendor session allowed), two ingestors
(FXPROXY_LEADER_TTL=1, short backoffs), two edges and five `Witness` clients spread over the
edges, each following some of the five symbols and resuming with `since` whenever its
connection drops. Then one fault, and every witness must show: no silent gap, no duplicate,
ticks flowing again within a stated bound, no symbol stuck. Each prints one measured line
(`CHAOS ...`) for the README failure-modes table.

"Ticks flow again" is measured per witness as the time from a moment (the fault, or the end of
it) until the first tick the vendor made after that moment arrives (`time_to_flow(fresh=True)`),
so ticks already in flight when the fault struck do not hide the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import orjson
import pytest
import redis

from tests.conftest import API_KEY, SYMBOLS, Cluster, StartProc
from tests.support.ports import free_port
from tests.support.procs import Proc
from tests.support.redis_server import RedisServer
from tests.support.witness import Witness

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]

TTL = 1.0  # FXPROXY_LEADER_TTL of the ingestors
ALL = SYMBOLS.split(",")
# (edge the witness starts on, symbols it follows): five witnesses, spread over two edges.
PLAN: list[tuple[int, list[str]]] = [
    (0, ALL), (1, ["EURUSD", "GBPUSD"]), (0, ["USDJPY", "AUDUSD", "USDCAD"]), (1, ALL),
    (0, ["EURUSD", "USDJPY"]),
]
SETTLE = 2.0  # seconds watched after ticks flow again: late duplicates and gaps show here
STUCK_AFTER = 1.0  # a symbol (20 ticks/s) without a tick this long at the end is stuck

Say = Callable[[str], None]


def now() -> float:
    return time.monotonic()


def status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(exc).__name__


@dataclass
class Rig:
    cluster: Cluster
    redis: RedisServer
    feed: Proc
    ingestors: dict[str, tuple[Proc, int]]  # node id -> (process, metrics port)
    edges: list[tuple[Proc, int]]
    witnesses: list[Witness] = field(default_factory=list)

    def leader(self) -> str | None:
        """Node id of the lease holder (fx:leader is `{node}.{nonce}:{epoch}.{rand}`)."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            value = client.get("fx:leader")
        finally:
            client.close()
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text.split(".")[0]

    def urls(self, first: int) -> list[str]:
        order = [first] + [i for i in range(len(self.edges)) if i != first]
        return [f"ws://127.0.0.1:{self.edges[i][1]}/v1/stream" for i in order]

    def on_edge(self, index: int) -> list[Witness]:
        return [w for w, (edge, _) in zip(self.witnesses, PLAN, strict=True) if edge == index]

    async def wait_flowing(self, after: float, timeout: float) -> float:
        """Wait (bounded) until every witness got a tick of every symbol after `after`."""
        deadline = now() + timeout
        while now() < deadline:
            t = now()
            if all(not w.stale_symbols(t, t - after) for w in self.witnesses):
                return t - after
            await asyncio.sleep(0.05)
        return now() - after

    async def stop(self) -> None:
        for w in self.witnesses:
            await w.stop()


async def start_rig(cluster: Cluster, redis_server: RedisServer, ingestor_env: dict[str, str] | None = None,
                    edge_env: dict[str, str] | None = None) -> Rig:
    feed = cluster.simfeed(rate=20)
    ingestors: dict[str, tuple[Proc, int]] = {}
    for node in ("ing-a", "ing-b"):
        port = free_port()
        ingestors[node] = (cluster.ingestor(
            FXPROXY_LEADER_TTL=str(TTL), FXPROXY_NODE_ID=node, FXPROXY_METRICS_PORT=str(port),
            FXPROXY_METRICS_HOST="127.0.0.1", **(ingestor_env or {})), port)
    edges = [cluster.edge(FXPROXY_EDGE_ID=f"edge-{i}", FXPROXY_DRAIN_TIMEOUT="1", **(edge_env or {}))
             for i in range(2)]
    rig = Rig(cluster, redis_server, feed, ingestors, edges)
    client = redis.Redis.from_url(redis_server.url)
    try:
        for _ in range(300):  # the leader has published every symbol: a subscribe finds them all
            if client.hlen("fx:last") >= len(ALL):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no ingestor published every symbol within 15 s:\n" +
                                 "\n".join(p.log[-1500:] for p, _ in ingestors.values()))
    finally:
        client.close()
    for i, (edge, symbols) in enumerate(PLAN):
        w = Witness(rig.urls(edge), API_KEY, symbols, name=f"w{i}@edge{edge}")
        rig.witnesses.append(w)
        w.start()
    t = now()
    waited = await rig.wait_flowing(t, 10)
    assert all(not w.stale_symbols(now(), 1.0) for w in rig.witnesses), \
        f"witnesses not flowing {waited:.1f}s after start:\n" + "\n".join(w.findings() for w in rig.witnesses)
    await asyncio.sleep(1.0)  # a baseline of clean ticks before the fault
    return rig


@pytest.fixture
async def rigs() -> AsyncIterator[list[Rig]]:
    """Rigs started by a test; their witnesses stop at teardown (processes end with `procs`)."""
    started: list[Rig] = []
    yield started
    for rig in started:
        await rig.stop()


@dataclass
class Result:
    flow: float | None  # worst time_to_flow over the witnesses
    resets: list[dict[str, object]]  # every reset frame any witness got


def conflicts(rig: Rig) -> list[str]:
    """Positions named with two different prices: between witnesses, or against fx:hist."""
    known: dict[tuple[str, str, int], tuple[object, ...]] = {}
    out: list[str] = []
    for w in rig.witnesses:
        for pos, price in w.seen().items():
            if known.setdefault(pos, price) != price:
                out.append(f"{pos}: {known[pos]} and {price} ({w.name})")
    client = redis.Redis.from_url(rig.redis.url, socket_timeout=5)
    try:
        for symbol in ALL:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(f"fx:hist:{symbol}")  # type: ignore[assignment]
            for _, fields in entries:
                d = orjson.loads(fields[b"p"])
                pos, price = (symbol, d["epoch"], d["seq"]), (d["ts"], d["bid"], d["ask"])
                if pos in known and known[pos] != price:
                    out.append(f"{pos}: clients got {known[pos]}, fx:hist holds {price}")
    finally:
        client.close()
    return out


async def finish(rig: Rig, say: Say, scenario: str, *, fault_at: float, flow_from: float, bound: float,
                 resets_allowed: bool, note: str = "") -> Result:
    """Watch SETTLE more seconds, stop the witnesses, print the measured line, then assert."""
    await rig.wait_flowing(flow_from, bound + 10)
    await asyncio.sleep(SETTLE)
    end = now()
    stale = {w.name: w.stale_symbols(end, STUCK_AFTER) for w in rig.witnesses}
    running = {w.name: w.running for w in rig.witnesses}
    await rig.stop()
    flows = {w.name: w.time_to_flow(flow_from, fresh=True) for w in rig.witnesses}
    measured = [f for f in flows.values() if f is not None]
    worst = max(measured) if len(measured) == len(flows) else None
    since_fault = [w.time_to_flow(fault_at, fresh=True) for w in rig.witnesses]
    pause = max(w.longest_pause(start=fault_at - 1.0) for w in rig.witnesses)
    gaps = sum(len(w.silent_gaps) for w in rig.witnesses)
    dups = sum(len(w.duplicates) for w in rig.witnesses)
    resets = sum(w.resets for w in rig.witnesses)
    announced = sum(w.announced for w in rig.witnesses)
    reconnects = sum(w.reconnects for w in rig.witnesses)
    recovered = [ok for w in rig.witnesses for (t, _, ok) in w.recoveries if t > fault_at]
    reasons = [str(e.detail.get("reason", "")) for w in rig.witnesses for e in w.events if e.kind == "reset"]
    lost = sum(1 for r in reasons if r.startswith("ticks "))
    kinds = f" ({resets - lost} new epoch, {lost} lost ticks)" if resets else ""
    flow_text = "never" if worst is None else f"{worst:.2f}s"
    fault_text = "" if flow_from == fault_at or None in since_fault else \
        f" ({max(f for f in since_fault if f is not None):.2f}s after the fault began)"
    say(f"CHAOS {scenario}: ticks flow again {flow_text}{fault_text} (bound {bound:.2f}s; worst of "
        f"{len(rig.witnesses)} witnesses), longest pause {pause:.2f}s, silent gaps {gaps}, duplicates "
        f"{dups}, resets {resets}{kinds}, announced {announced}, reconnects {reconnects}, resumes recovered "
        f"true/false {recovered.count(True)}/{recovered.count(False)}{'; ' + note if note else ''}")
    report = "\n".join(w.findings() for w in rig.witnesses)
    for w in rig.witnesses:
        assert not w.silent_gaps, f"{w.name} saw silent gaps:\n{report}"
        assert not w.duplicates, f"{w.name} saw duplicates:\n{report}"
        assert not w.anomalies, f"{w.name} saw unexpected frames:\n{report}"
        assert w.gave_up is None and running[w.name], f"{w.name} stopped reconnecting:\n{report}"
        assert not stale[w.name], f"{w.name} stuck on {stale[w.name]} at the end:\n{report}"
        flow = flows[w.name]
        assert flow is not None and flow <= bound, \
            f"{w.name}: ticks flowed again after {flow if flow is None else round(flow, 2)}s, " \
            f"bound {bound:.2f}s:\n{report}"
        if not resets_allowed:
            assert w.resets == 0 and w.announced == 0, f"{w.name}: unexpected resets:\n{report}"
    clash = conflicts(rig)
    assert not clash, "one position, two prices:\n" + "\n".join(clash[:10])
    return Result(worst, [e.detail for w in rig.witnesses for e in w.events if e.kind == "reset"])


def freeze(proc: Proc | RedisServer) -> None:
    target = proc.proc
    assert target is not None
    target.send_signal(signal.SIGSTOP)


def thaw(proc: Proc | RedisServer) -> None:
    target = proc.proc
    if target is not None and target.poll() is None:
        target.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def frozen(proc: Proc | RedisServer) -> Iterator[None]:
    freeze(proc)
    try:
        yield
    finally:
        thaw(proc)


# Ingestors


async def test_leader_killed_standby_continues_seq_without_gap(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    leader = rig.leader()
    assert leader in rig.ingestors
    fault = now()
    rig.ingestors[leader][0].kill()
    # Bound: lease runs out (TTL) + standby's poll (TTL/3) + vendor login, and slack for 2 cores.
    await finish(rig, say, "kill -9 the leading ingestor", fault_at=fault, flow_from=fault,
                 bound=TTL + TTL / 3 + 1.7, resets_allowed=False)
    assert rig.leader() not in (None, leader)


async def test_leader_frozen_past_ttl_blocks_the_vendor_until_it_thaws(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    """A frozen leader keeps the vendor's only session: the standby takes the lease after TTL but
    cannot log in, so ticks stop for as long as the freeze lasts. Once thawed, the old leader
    finds the lease taken (or is fenced), leaves the vendor, and the standby logs in."""
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    leader = rig.leader()
    assert leader in rig.ingestors
    proc = rig.ingestors[leader][0]
    hold = 3 * TTL
    fault = now()
    with frozen(proc):
        await asyncio.sleep(hold)
        during = rig.leader()
        no_flow = all(w.time_to_flow(fault + 0.5, fresh=True) is None for w in rig.witnesses)
    thawed = now()
    assert during not in (None, leader), "the standby should hold the lease while the leader is frozen"
    assert no_flow, "ticks flowed while the frozen leader held the vendor's only session?"
    # Bound after the thaw: old leader's renew poll (TTL/3) notices the lease is gone and leaves the
    # vendor; the standby's next upstream attempt (backoff <= 1 s) logs in.
    await finish(rig, say, f"SIGSTOP the leading ingestor {hold:g}s (> TTL) then SIGCONT", fault_at=fault,
                 flow_from=thawed, bound=TTL / 3 + 1.0 + 1.2, resets_allowed=False,
                 note="no ticks during the freeze; standby held the lease, vendor refused it")


# Redis


async def test_redis_killed_and_restarted_at_once(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    fault = now()
    redis_server.stop()
    redis_server.start()
    # The leader keeps its positions and its queue, and almost always retakes the lease in the
    # empty Redis (its retries are 4x as frequent as a standby's polls): no reset. If the standby
    # claims first, it has nothing to continue from and starts new epochs, announced; a lost
    # tick ("ticks A-B lost") is never acceptable here.
    result = await finish(rig, say, "kill -9 Redis (no persistence), restart at once", fault_at=fault,
                          flow_from=fault, bound=3.0, resets_allowed=True)
    assert not [r for r in result.resets if str(r.get("reason", "")).startswith("ticks ")], result.resets


async def test_redis_down_past_ttl_without_persistence_announces_lost_history(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    fault = now()
    redis_server.stop()
    await asyncio.sleep(2 * TTL)
    redis_server.start()
    back = now()
    await finish(rig, say, f"kill -9 Redis (no persistence), restart after {2 * TTL:g}s", fault_at=fault,
                 flow_from=back, bound=TTL / 3 + 2.5, resets_allowed=True)


async def test_redis_down_past_ttl_with_aof_resumes_without_reset(
        procs: StartProc, persistent_redis: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(Cluster(procs, persistent_redis.url), persistent_redis)
    rigs.append(rig)
    await asyncio.sleep(1.2)  # appendfsync everysec: let the baseline reach the disk
    fault = now()
    persistent_redis.stop()
    await asyncio.sleep(2 * TTL)
    persistent_redis.start()
    back = now()
    result = await finish(rig, say, f"kill -9 Redis (AOF everysec), restart after {2 * TTL:g}s",
                          fault_at=fault, flow_from=back, bound=TTL / 3 + 2.5, resets_allowed=True)
    assert not result.resets, f"data survived, yet: {result.resets}"


async def test_redis_hung_then_killed_with_aof_loses_no_numbered_tick(
        procs: StartProc, persistent_redis: RedisServer, rigs: list[Rig], say: Say) -> None:
    """Redis hangs (the leader's publish is in flight, unanswered), its supervisor kills it after
    2 x TTL and restarts it from its AOF. Nothing the ingestor numbered may go missing.

    The standby has died before (or the deployment runs one ingestor), so the same process leads
    again: with a standby, whichever claims first after the restart leads, and a standby that
    wins continues cleanly from fx:last, hiding the loss half of the time."""
    rig = await start_rig(Cluster(procs, persistent_redis.url), persistent_redis)
    rigs.append(rig)
    leader = rig.leader()
    for node, (proc, _) in rig.ingestors.items():
        if node != leader:
            proc.kill()
    await asyncio.sleep(1.2)  # appendfsync everysec: let the baseline reach the disk
    fault = now()
    with frozen(persistent_redis):
        await asyncio.sleep(2 * TTL)  # the leader stands down after TTL, its publish unanswered
        persistent_redis.stop()  # SIGKILL reaches a stopped process
    persistent_redis.start()
    back = now()
    result = await finish(rig, say, f"SIGSTOP Redis (AOF), kill -9 it after {2 * TTL:g}s, restart "
                          "(one ingestor left)",
                          fault_at=fault, flow_from=back, bound=TTL / 3 + 2.5, resets_allowed=True)
    assert not result.resets, f"ticks numbered by the ingestor went missing: {result.resets}"


@pytest.mark.slow
async def test_redis_hung_20s_edges_and_ingestors_turn_unready_and_flow_resumes(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    hang = 20.0
    urls = [f"http://127.0.0.1:{port}/readyz" for _, port in rig.edges]
    urls += [f"http://127.0.0.1:{port}/readyz" for _, port in rig.ingestors.values()]
    before = await asyncio.gather(*(asyncio.to_thread(status, u) for u in urls))
    assert before[:2] == [200, 200] and sorted(before[2:], key=str) == [200, 503], before
    urls = [u for u, code in zip(urls, before, strict=True) if code == 200]  # edges and the leader
    unready_after: dict[str, float] = {}
    fault = now()
    with frozen(redis_server):
        while now() - fault < hang:
            if len(unready_after) < len(urls):
                for url, code in zip(urls, await asyncio.gather(
                        *(asyncio.to_thread(status, u) for u in urls)), strict=True):
                    if code != 200 and url not in unready_after:
                        unready_after[url] = now() - fault
            await asyncio.sleep(0.1)
    back = now()
    slowest = max(unready_after.values(), default=float("inf"))
    await finish(rig, say, f"SIGSTOP Redis {hang:g}s then SIGCONT", fault_at=fault, flow_from=back,
                 bound=TTL + 2.0, resets_allowed=False,
                 note=f"/readyz of both edges and the leader 503 within {slowest:.2f}s")
    assert len(unready_after) == len(urls) and slowest <= 2.5, \
        f"/readyz must turn 503 within ~2 s of Redis hanging: {unready_after} of {urls}"
    ready = [await asyncio.to_thread(status, u) for u in urls[:2]]
    assert ready == [200, 200], f"edges not ready again after the hang: {ready}"


# Edges


async def test_edge_killed_its_clients_resume_elsewhere_with_full_recovery(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    moved = rig.on_edge(0)
    fault = now()
    rig.edges[0][0].kill()
    await finish(rig, say, "kill -9 an edge", fault_at=fault, flow_from=fault, bound=1.5,
                 resets_allowed=False)
    for w in moved:
        resumed = [(s, ok) for t, s, ok in w.recoveries if t > fault]
        assert w.reconnects == 1 and sorted(s for s, _ in resumed) == sorted(w.symbols), w.findings()
        assert all(ok for _, ok in resumed), f"{w.name} resumed with recovered:false: {resumed}"
    assert all(w.reconnects == 0 for w in rig.on_edge(1))


async def test_edge_sigterm_drains_with_1001_and_clients_resume_elsewhere(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    rig = await start_rig(cluster, redis_server)
    rigs.append(rig)
    moved = rig.on_edge(0)
    proc = rig.edges[0][0]
    fault = now()
    proc.proc.send_signal(signal.SIGTERM)
    # Bound: the drain spreads closes over FXPROXY_DRAIN_TIMEOUT (1 s), then a reconnect.
    await finish(rig, say, "SIGTERM an edge (drain 1 s)", fault_at=fault, flow_from=fault, bound=2.0,
                 resets_allowed=False)
    assert await asyncio.to_thread(proc.proc.wait, 15) == 0
    for w in moved:
        assert [code for t, code, _ in w.closes if t > fault] == [1001], w.findings()
        resumed = [(s, ok) for t, s, ok in w.recoveries if t > fault]
        assert sorted(s for s, _ in resumed) == sorted(w.symbols) and all(ok for _, ok in resumed), \
            f"{w.name} did not resume every symbol with recovered:true: {resumed}"


# Upstream


async def test_upstream_killed_twice_reconnects_quickly_both_times(
        cluster: Cluster, redis_server: RedisServer, rigs: list[Rig], say: Say) -> None:
    # A long backoff ceiling: if the delay did not reset after a good login, the second outage
    # would wait longer than the first.
    rig = await start_rig(cluster, redis_server, ingestor_env={"FXPROXY_BACKOFF_MAX": "10"})
    rigs.append(rig)
    down = 0.5
    fault = now()
    downtimes: list[float] = []
    flows: list[float | None] = []
    for _ in range(2):
        killed = now()
        rig.feed.kill()
        await asyncio.sleep(down)
        rig.feed = await asyncio.to_thread(cluster.simfeed, cluster.feed_port, 20)
        restarted = now()
        downtimes.append(restarted - killed)  # includes simfeed's own start-up
        await rig.wait_flowing(restarted, 10)
        flows.append(max((f for w in rig.witnesses if (f := w.time_to_flow(restarted, fresh=True))
                          is not None), default=None))
        await asyncio.sleep(1.0)
    shown = ", ".join(f"{'never' if f is None else f'{f:.2f}s'} after {d:.2f}s down"
                      for f, d in zip(flows, downtimes, strict=True))
    # Reconnect delays double from 0.2 s after each good login, each drawn from [ceiling/2,
    # ceiling]. If the feed is back D s after the kill, the attempts made so far add up to at
    # least 0.1 (2^k - 1) < D, so the next delay (<= 0.2 * 2^k) is under 2 D + 0.2 s: that bounds
    # the wait after the restart; 0.2 s more for the login and the first tick. (Without the reset
    # the second outage would start from the first one's delay; with jitter this bound does not
    # always catch that, the printed numbers show it.)
    def bound(down_for: float) -> float:
        return 2 * down_for + 0.4

    await finish(rig, say, f"upstream (simfeed) killed twice, restarted after {down:g}s", fault_at=fault,
                 flow_from=restarted, bound=bound(downtimes[-1]), resets_allowed=False,
                 note=f"flow after each restart: {shown}")
    assert flows[0] is not None and flows[0] <= bound(downtimes[0]), f"first restart: {shown}"
