"""Ingestor throughput: vendor JSON -> parse -> seq -> encode -> pipelined publish to Redis.

    python bench/ingest.py [--ticks 200000] [--symbols 20] [--cluster [--repeat 3]]

Starts its own redis-server on a free loopback port, feeds the ingestor's real code
path (tradermade.parse_message, Sequencer, Publisher fenced by a real lease, RedisBus)
as fast as it takes ticks, and prints ticks/s published, CPU per tick of this process, and Redis CPU per
tick (utime + stime of the redis-server processes, from /proc, before and after).
With --cluster it then does the same into a 3-primary Redis Cluster (ClusterBus,
sharded pub/sub), and prints both side by side with the rate each shard took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from ingestor.leader import RedisLeadership
from ingestor.publisher import Publisher
from ingestor.sequencer import Sequencer
from ingestor.vendors.tradermade import parse_message
from shared.bus import Bus
from shared.cluster_bus import ClusterBus
from shared.redis_bus import RedisBus
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer

CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK


async def run(bus: Bus, redis_pids: Sequence[int], ticks: int, symbols: int) -> dict[str, float]:
    names = [f"SYM{i:03d}" for i in range(symbols)]
    raw = [orjson.dumps({"symbol": names[i % symbols], "ts": str(1732186000000 + i),
                         "bid": 1.08512, "ask": 1.08519, "mid": 1.085155}).decode()
           for i in range(ticks)]
    seq = Sequencer()
    # Fenced by a real lease, as a leading ingestor publishes (on a cluster that costs a lease
    # read per batch, see shared/cluster_bus.py).
    leadership = RedisLeadership.from_url(bus.url, bus.names, "bench", ttl=60)
    assert await leadership.claim()
    publisher = Publisher(bus, fence=leadership.fence)
    task = asyncio.create_task(publisher.run())
    redis0, cpu0, t0 = cpu_seconds(redis_pids), time.process_time(), time.perf_counter()
    chunk = 500  # the upstream reader yields to the loop between socket reads
    for i in range(0, ticks, chunk):
        for message in raw[i:i + chunk]:
            quote = parse_message(message)
            assert quote is not None
            publisher.put(seq.number(quote))
        await asyncio.sleep(0)
    assert await publisher.flush(120)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    redis_cpu = cpu_seconds(redis_pids) - redis0
    task.cancel()
    await leadership.close()
    stored = len(await bus.history(names[0], 0, ticks))
    assert stored >= min(ticks // symbols, 1000) * 0.9, f"history of {names[0]} holds {stored}"
    return {"ticks": ticks, "ticks_per_s": ticks / wall, "cpu_us_per_tick": cpu / ticks * 1e6,
            "redis_us_per_tick": redis_cpu / ticks * 1e6, "wall_s": wall}


async def single(ticks: int, symbols: int) -> dict[str, float]:
    server = RedisServer()
    server.start()
    try:
        assert server.proc is not None
        bus = RedisBus.from_url(server.url)
        try:
            return await run(bus, [server.proc.pid], ticks, symbols)
        finally:
            await bus.close()
    finally:
        server.close()


async def cluster(ticks: int, symbols: int) -> tuple[dict[str, float], dict[int, float]]:
    built = RedisCluster(primaries=3, replicas=0)
    await asyncio.to_thread(built.start)
    try:
        bus = ClusterBus(built.url)
        try:
            result = await run(bus, [p.pid for p in built.procs.values()], ticks, symbols)
        finally:
            await bus.close()
        owners = Counter(built.owner(bus.names.history(f"SYM{i:03d}")) for i in range(symbols))
        per_shard = {port: ticks * n / symbols / result["wall_s"] for port, n in owners.items()}
        return result, per_shard
    finally:
        built.close()


def line(label: str, r: dict[str, float]) -> str:
    return (f"{label:<22} {r['ticks_per_s']:>10,.0f} ticks/s   {r['cpu_us_per_tick']:5.1f} µs CPU/tick "
            f"ingestor   {r['redis_us_per_tick']:5.1f} µs CPU/tick Redis   "
            f"({r['wall_s']:.2f} s for {int(r['ticks']):,} ticks)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=200_000)
    p.add_argument("--symbols", type=int, default=20)
    p.add_argument("--cluster", action="store_true",
                   help="also publish into a 3-primary Redis Cluster and print both side by side")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --cluster: runs of each, alternating; the median run of each is shown")
    args = p.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        if not args.cluster:
            one = runner.run(single(args.ticks, args.symbols))
            print(f"ingestor: {one['ticks_per_s']:,.0f} ticks/s published "
                  f"({one['cpu_us_per_tick']:.1f} µs CPU per tick in this process, "
                  f"{one['redis_us_per_tick']:.1f} µs in Redis, "
                  f"{one['wall_s']:.2f} s for {args.ticks:,} ticks, pid {os.getpid()})")
            return
        # Alternating runs: a machine shared with other work drifts, and each mode sees the drift.
        ones, threes = [], []
        for _ in range(max(1, args.repeat)):
            ones.append(runner.run(single(args.ticks, args.symbols)))
            threes.append(runner.run(cluster(args.ticks, args.symbols)))
    one = median(ones)
    three, per_shard = median(threes, key=lambda r: r[0]["ticks_per_s"])
    print(f"ingest, {args.symbols} symbols, {os.cpu_count()} cores (ingestor and Redis share them), "
          f"median of {len(ones)} alternating run(s) each:")
    print(line("1 Redis", one))
    print(line("Redis Cluster, 3 prim.", three))
    shards = ", ".join(f":{port} {rate:,.0f}/s" for port, rate in sorted(per_shard.items()))
    print(f"{'':<22} per shard: {shards}")
    if len(ones) > 1:
        print("all runs, ticks/s: 1 Redis " + ", ".join(f"{r['ticks_per_s']:,.0f}" for r in ones) +
              "; cluster " + ", ".join(f"{r[0]['ticks_per_s']:,.0f}" for r in threes))


T = TypeVar("T")


def median(runs: list[T], key: Callable[[T], float] | None = None) -> T:
    """The median run by ticks/s (the lower middle one of an even count)."""
    rank = key or (lambda r: r["ticks_per_s"])  # type: ignore[index]
    return sorted(runs, key=rank)[(len(runs) - 1) // 2]


if __name__ == "__main__":
    main()
