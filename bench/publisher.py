"""Fixed-rate tick publisher for the fan-out benchmark.

Publishes ``--rate`` messages per second in total, round-robin over the symbols,
to the Redis channels ``fx:tick:{SYMBOL}``. Each payload looks exactly like the
ingestor's ticks plus a ``pt`` field (wall-clock publish time in microseconds)
so that a client can compute publish -> receive latency::

    {"type":"tick","symbol":"EURUSD","bid":1.08512,"ask":1.08519,"mid":1.085155,
     "ts":1732186000123,"epoch":"bench","seq":1235,"pt":1732186000123456}

Pacing uses the monotonic clock: on every scheduler tick all messages that are
due so far are sent in pipelined batches (no MULTI). The first message of each
symbol is also stored with ``HSET fx:last SYMBOL payload`` so snapshots exist.

Prints one JSON summary line to stdout at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

BASE_PRICES: dict[str, float] = {
    "EURUSD": 1.0850,
    "GBPUSD": 1.2650,
    "USDJPY": 151.20,
    "AUDUSD": 0.6550,
    "USDCAD": 1.3650,
    "USDCHF": 0.8850,
    "NZDUSD": 0.5950,
    "EURGBP": 0.8580,
    "EURJPY": 164.10,
    "GBPJPY": 191.30,
    "AUDJPY": 99.05,
    "EURCHF": 0.9600,
    "EURAUD": 1.6560,
    "EURCAD": 1.4810,
    "GBPCHF": 1.1190,
    "CADJPY": 110.80,
    "CHFJPY": 170.90,
    "AUDNZD": 1.1010,
    "XAUUSD": 2650.0,
    "XAGUSD": 31.20,
}

MAX_BATCH = 500
"""Most commands in one pipeline round trip."""

MIN_SLEEP_S = 0.0005
"""Shortest pause between scheduler ticks (lets high rates batch up)."""


@dataclass
class SymbolState:
    symbol: str
    channel: str
    bid: float
    digits: int
    spread: float
    seq: int = 0
    stored: bool = False


@dataclass
class Stats:
    published: int = 0
    batches: int = 0
    max_lag_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def make_states(symbols: list[str], prefix: str) -> list[SymbolState]:
    states: list[SymbolState] = []
    for i, sym in enumerate(symbols):
        base = BASE_PRICES.get(sym, 1.0 + 0.01 * i)
        digits = 3 if base > 20 else 5
        pip = 10.0 ** -(digits - 1)
        states.append(
            SymbolState(
                symbol=sym,
                channel=f"{prefix}tick:{sym}",
                bid=base,
                digits=digits,
                spread=0.7 * pip,
            )
        )
    return states


def next_payload(st: SymbolState, rnd: random.Random, *, advance: bool = True) -> bytes:
    """Advance the symbol's random walk and return the encoded tick (with ``pt``).

    With ``advance=False`` the current state (seq included) is encoded as is.
    """
    pip = 10.0 ** -(st.digits - 1)
    if advance:
        st.bid = max(pip, st.bid + rnd.choice((-1, 0, 1)) * 0.1 * pip)
        st.seq += 1
    d = st.digits
    bid = round(st.bid, d)
    ask = round(bid + st.spread, d)
    mid = round((bid + ask) / 2, d + 1)
    now_ns = time.time_ns()
    return (
        f'{{"type":"tick","symbol":"{st.symbol}","bid":{bid:.{d}f},"ask":{ask:.{d}f},'
        f'"mid":{mid:.{d + 1}f},"ts":{now_ns // 1_000_000},"epoch":"bench","seq":{st.seq},'
        f'"pt":{now_ns // 1000}}}'
    ).encode()


async def run(args: argparse.Namespace) -> Stats:
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if not symbols:
        raise SystemExit("publisher: no symbols")
    states = make_states(symbols, args.prefix)
    rnd = random.Random(args.seed)
    stats = Stats()
    client = aioredis.from_url(args.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await client.ping()
        if args.seed_only:
            # seq 0 snapshots: servers that only accept symbols known in fx:last accept them,
            # and the first live tick (seq 1) follows without a gap.
            mapping = {st.symbol: next_payload(st, rnd, advance=False) for st in states}
            await client.hset(f"{args.prefix}last", mapping=mapping)  # type: ignore[arg-type]
            print(json.dumps({"seeded": len(mapping)}), flush=True)
            return stats
        rate = float(args.rate)
        total = int(rate * args.duration)
        start = time.monotonic()
        deadline = start + args.duration
        idx = 0
        last_key = f"{args.prefix}last"
        while stats.published < total and not stop.is_set():
            now = time.monotonic()
            if now >= deadline + 1.0:
                break  # hopelessly behind: stop anyway (bounded run time)
            due = min(total, int((now - start) * rate) + 1) - stats.published
            while due > 0:
                n = min(due, MAX_BATCH)
                pipe = client.pipeline(transaction=False)
                for _ in range(n):
                    st = states[idx]
                    idx = (idx + 1) % len(states)
                    payload = next_payload(st, rnd)
                    if not st.stored:
                        pipe.hset(last_key, st.symbol, payload)
                        st.stored = True
                    pipe.publish(st.channel, payload)
                await pipe.execute()
                stats.published += n
                stats.batches += 1
                due -= n
            lag = time.monotonic() - (start + stats.published / rate)
            stats.max_lag_s = max(stats.max_lag_s, lag)
            next_due = start + (stats.published + 1) / rate
            await asyncio.sleep(max(MIN_SLEEP_S, next_due - time.monotonic()))
        elapsed = time.monotonic() - start
        stats.max_lag_s = max(0.0, stats.max_lag_s)
        summary = {
            "published": stats.published,
            "target": total,
            "elapsed_s": round(elapsed, 6),
            "rate": round(stats.published / elapsed, 3) if elapsed > 0 else 0.0,
            "target_rate": rate,
            "symbols": len(symbols),
            "batches": stats.batches,
            "max_lag_ms": round(stats.max_lag_s * 1000, 3),
        }
        print(json.dumps(summary), flush=True)
    finally:
        await client.aclose()
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6380/0")
    p.add_argument("--symbols", default="EURUSD,GBPUSD,USDJPY")
    p.add_argument("--rate", type=float, default=100.0, help="messages per second in total")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--prefix", default="fx:", help="key/channel prefix")
    p.add_argument("--seed", type=int, default=1, help="random seed of the price walk")
    p.add_argument(
        "--seed-only",
        action="store_true",
        help="store a seq-0 tick per symbol in fx:last (snapshots) and exit",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
