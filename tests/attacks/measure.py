"""What an attack costs: a well-behaved neighbour's tick-to-tick gaps, the edge's RSS, /healthz latency."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import API_KEY
from tests.support.client import open_native, recv_json, send_json

# Tests run with a fast feed so that a stall shows up as a gap: 50 ticks/s per symbol, a tick of
# each symbol every 20 ms.
NEIGHBOUR_SYMBOLS = ["EURUSD", "GBPUSD", "USDJPY"]


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc/PID/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Arrival:
    at: float  # time.monotonic() when the neighbour had it
    symbol: str
    seq: int
    ts: int  # simfeed's send time, ms since the epoch
    conflated: bool


@dataclass
class Neighbour:
    """A client that does everything right: subscribed to a few symbols, reading all the time."""

    ws: ClientConnection
    symbols: list[str]
    ticks: list[Arrival] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)  # anything but a tick after subscribing
    closed: BaseException | None = None
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                msg = orjson.loads(raw)
                if msg.get("type") == "tick":
                    if not msg.get("snapshot"):
                        self.ticks.append(Arrival(now, msg["symbol"], msg["seq"], msg["ts"],
                                                  bool(msg.get("conflated"))))
                elif msg.get("type") != "pong":
                    self.other.append(msg)
        except ConnectionClosed as exc:
            self.closed = exc

    def worst_gap(self, t0: float, t1: float) -> float:
        """The longest wait between two ticks of one symbol that overlaps [t0, t1], in seconds; a
        wait still going on at t1 counts up to t1."""
        worst = 0.0
        for symbol in self.symbols:
            times = [a.at for a in self.ticks if a.symbol == symbol]
            for before, after in itertools.pairwise(times):
                if after > t0 and before < t1:
                    worst = max(worst, after - before)
            last_before = max((t for t in times if t < t1), default=t0)
            if not any(t >= t1 for t in times):
                worst = max(worst, t1 - max(last_before, t0))
        return worst

    def gaps(self, t0: float, t1: float, n: int = 5) -> list[tuple[float, float, str]]:
        """The `n` longest waits overlapping [t0, t1]: (start - t0, length, symbol), for reports."""
        out = []
        for symbol in self.symbols:
            times = [a.at for a in self.ticks if a.symbol == symbol]
            out += [(before - t0, after - before, symbol) for before, after in itertools.pairwise(times)
                    if after > t0 and before < t1]
        return sorted(out, key=lambda g: -g[1])[:n]

    def latency(self, t0: float, t1: float) -> float:
        """Worst delay from the feed's send time (`ts`) to the neighbour, among ticks in [t0, t1]."""
        offset = time.time() - time.monotonic()
        return max((a.at + offset - a.ts / 1000 for a in self.ticks if t0 <= a.at <= t1), default=0.0)

    def count(self, t0: float, t1: float) -> int:
        return sum(1 for a in self.ticks if t0 <= a.at <= t1)

    def assert_contiguous(self) -> None:
        """Every symbol's seqs grew by exactly one, nothing conflated, no reset, still connected."""
        assert self.closed is None, f"the neighbour was disconnected: {self.closed!r}"
        assert not self.other, f"the neighbour got unexpected frames: {self.other[:3]}"
        for symbol in self.symbols:
            seqs = [a.seq for a in self.ticks if a.symbol == symbol]
            assert len(seqs) > 10, f"{symbol}: only {len(seqs)} ticks"
            holes = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
            assert not holes, f"{symbol}: seq jumps {holes[:5]}"
        assert not any(a.conflated for a in self.ticks), "the neighbour's ticks were conflated"


async def wait_ticking(redis_url: str, symbols: list[str], timeout: float = 15.0) -> None:
    """Wait until every symbol has a last tick in Redis (the feed and the ingestor are up)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            have = {k.decode() if isinstance(k, bytes) else k for k in await client.hkeys("fx:last")}
            if set(symbols) <= have:
                return
            assert time.monotonic() < deadline, f"never ticked: {sorted(set(symbols) - have)}"
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def neighbour(port: int, redis_url: str, symbols: list[str] | None = None) -> AsyncIterator[Neighbour]:
    """Connect with the key, subscribe, and read everything in the background."""
    symbols = symbols or NEIGHBOUR_SYMBOLS
    await wait_ticking(redis_url, symbols)
    ws = await open_native(port, API_KEY, max_queue=None, ping_interval=None)
    n = Neighbour(ws, symbols)
    try:
        await send_json(ws, {"op": "subscribe", "symbols": symbols, "id": 1})
        reply = await recv_json(ws)
        assert reply == {"type": "subscribed", "id": 1, "symbols": symbols}, reply
        n.task = asyncio.get_running_loop().create_task(n._read())
        yield n
    finally:
        await ws.close()
        if n.task is not None:
            await asyncio.wait_for(n.task, 5)


async def baseline_gap(n: Neighbour, seconds: float = 2.0) -> float:
    """The neighbour's worst tick-to-tick gap with nobody attacking."""
    await asyncio.sleep(0.5)  # past the subscribe
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    return n.worst_gap(t0, time.monotonic())


class Sampler:
    """Sample the edge's RSS and /healthz latency every `every` seconds while an attack runs."""

    def __init__(self, pid: int, port: int, every: float = 0.1, health: bool = True) -> None:
        self.pid, self.port, self.every, self.health = pid, port, every, health
        self.rss: list[tuple[float, float]] = []
        self.healthz: list[float] = []
        self.health_errors: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def peak_rss(self) -> float:
        return max(mb for _, mb in self.rss)

    @property
    def worst_healthz(self) -> float:
        return max(self.healthz) if self.healthz else float("inf")

    async def _probe(self) -> None:
        start = time.monotonic()
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                body = await reader.read(4096)
                writer.close()
        except (TimeoutError, OSError) as exc:
            self.health_errors.append(repr(exc))
            self.healthz.append(time.monotonic() - start)
            return
        self.healthz.append(time.monotonic() - start)
        if not body.startswith(b"HTTP/1.1 200"):
            self.health_errors.append(repr(body[:80]))

    async def _run(self, max_samples: int) -> None:
        for _ in range(max_samples):
            self.rss.append((time.monotonic(), rss_mb(self.pid)))
            if self.health:
                await self._probe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)
            if self._stop.is_set():
                return

    def start(self, max_seconds: float = 60.0) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run(int(max_seconds / self.every)))
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)
        self.rss.append((time.monotonic(), rss_mb(self.pid)))


def edge_errors(log: str) -> list[str]:
    """Lines the edge logged at ERROR or above (a traceback is a bug whatever the client sent)."""
    out = []
    for line in log.splitlines():
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            if "Traceback" in line:
                out.append(line)
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "critical"):
            out.append(line[:400])
    return out
