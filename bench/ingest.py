"""Ingestor throughput: vendor JSON -> parse -> seq -> encode -> pipelined publish to Redis.

    python bench/ingest.py [--ticks 200000] [--symbols 20]

Starts its own redis-server on a free loopback port, feeds the ingestor's real code
path (tradermade.parse_message, Sequencer, Publisher, RedisBus) as fast as it takes
ticks, and prints ticks/s published and CPU per tick of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from ingestor.publisher import Publisher
from ingestor.sequencer import Sequencer
from ingestor.vendors.tradermade import parse_message
from shared.redis_bus import RedisBus
from tests.support.redis_server import RedisServer


async def run(ticks: int, symbols: int) -> dict[str, float]:
    server = RedisServer()
    server.start()
    try:
        bus = RedisBus.from_url(server.url)
        names = [f"SYM{i:03d}" for i in range(symbols)]
        raw = [orjson.dumps({"symbol": names[i % symbols], "ts": str(1732186000000 + i),
                             "bid": 1.08512, "ask": 1.08519, "mid": 1.085155}).decode()
               for i in range(ticks)]
        seq = Sequencer()
        publisher = Publisher(bus)
        task = asyncio.create_task(publisher.run())
        cpu0, t0 = time.process_time(), time.perf_counter()
        chunk = 500  # the upstream reader yields to the loop between socket reads
        for i in range(0, ticks, chunk):
            for message in raw[i:i + chunk]:
                quote = parse_message(message)
                assert quote is not None
                publisher.put(seq.number(quote))
            await asyncio.sleep(0)
        assert await publisher.flush(120)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        task.cancel()
        stored = await bus.client.xlen(bus.names.history(names[0]))
        await bus.close()
        return {"ticks": ticks, "ticks_per_s": ticks / wall, "cpu_us_per_tick": cpu / ticks * 1e6,
                "wall_s": wall, "hist_len_sym0": stored}
    finally:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=200_000)
    p.add_argument("--symbols", type=int, default=20)
    args = p.parse_args()
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(run(args.ticks, args.symbols))
    print(f"ingestor: {result['ticks_per_s']:,.0f} ticks/s published "
          f"({result['cpu_us_per_tick']:.1f} µs CPU per tick in this process, "
          f"{result['wall_s']:.2f} s for {args.ticks:,} ticks, pid {os.getpid()})")


if __name__ == "__main__":
    main()
