"""`fxproxy demo`: simulated feed, ingestor and edge in one process on the in-memory bus."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from edge.app import EdgeApp
from fxproxy.simfeed import PAIRS, SimFeed
from fxproxy.tail import tail
from ingestor.app import run_ingestor
from shared.demand import MemoryDemandStore
from shared.memory_bus import MemoryBus
from shared.settings import EdgeSettings, IngestorSettings

DEMO_SYMBOLS = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCAD", "USDCHF", "NZDUSD", "EURGBP",
                "EURJPY", "GBPJPY", "EURCHF", "AUDJPY", "EURAUD", "USDSEK", "USDNOK", "XAUUSD"]
SHOWN = ["EURUSD", "GBPUSD", "USDJPY"]


async def run_demo(port: int, key: str, duration: float, rate: float,
                   interrupted: asyncio.Event | None = None) -> int:
    """Run until `duration` passes (0 = no limit) or `interrupted` is set (Ctrl-C)."""
    interrupted = interrupted or asyncio.Event()
    bus = MemoryBus()
    demand = MemoryDemandStore()  # edge and ingestor share it: symbols outside the list stream too
    upstream_key = "demo-upstream-key"
    feed = SimFeed(upstream_key, rate)
    feed_port = await feed.start("127.0.0.1", 0)
    stop = asyncio.Event()
    ingestor = asyncio.create_task(run_ingestor(
        IngestorSettings(
            upstream_urls=[f"ws://127.0.0.1:{feed_port}/"], upstream_key=upstream_key,
            symbols=DEMO_SYMBOLS, on_demand=[s for s in PAIRS if s not in DEMO_SYMBOLS],
            metrics_port=0,
        ),
        bus, stop, demand=demand,
    ))
    edge = EdgeApp(EdgeSettings(host="127.0.0.1", port=port, api_keys=[key]), bus, None, demand)
    try:
        bound = await edge.start()
    except OSError as exc:
        print(f"fxproxy demo: cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
              f"try --port {port + 1}", file=sys.stderr)
        stop.set()
        await ingestor
        await feed.close()
        return 1
    base = f"ws://127.0.0.1:{bound}"
    print(f"""fxproxy demo is running (simulated feed -> ingestor -> in-memory bus -> edge)

  native stream     {base}/v1/stream      (header: Authorization: Bearer {key})
  TraderMade style  {base}/feedadv
  health / metrics  http://127.0.0.1:{bound}/readyz   http://127.0.0.1:{bound}/metrics
  API key           {key}

  try:  fxproxy tail {base}/v1/stream --key {key} --symbols EURUSD,XAUUSD

Live ticks as a client of the edge receives them ({', '.join(SHOWN)}); Ctrl-C to stop:
""", flush=True)
    try:
        await asyncio.sleep(0.2)  # let the first ticks reach the bus, so snapshots exist
        client = asyncio.create_task(tail(f"{base}/v1/stream", key, SHOWN, duration=duration))
        ctrl_c = asyncio.create_task(interrupted.wait())
        await asyncio.wait([client, ctrl_c], return_when=asyncio.FIRST_COMPLETED)
        for task in (client, ctrl_c):
            task.cancel()
        if interrupted.is_set():
            print("\nstopping ...", file=sys.stderr)
    finally:
        stop.set()
        await edge.stop(drain_timeout=0)
        with contextlib.suppress(asyncio.CancelledError):
            await ingestor
        await feed.close()
    return 0
