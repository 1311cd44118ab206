"""A pipeline under witnesses for bus failover tests: simfeed, two ingestors, two edges, and
Witness clients on both edges, on whatever bus URL (cluster or sentinel) the test gives.

`measure()` waits until every witness has a fresh tick of every streamed symbol after a moment,
watches a little longer for late gaps and duplicates, then returns the figures the tests assert
bounds on.

Two kinds of extra symbols: `quiet` ones are followed by every witness, configured at the
ingestors, and carried by the feed but never quoted: the test stores their ticks itself
(`store_ticks`), so that ticks written to history without a publish (as if pub/sub lost them
when the node died) reach clients only through the edges' history refill after a resubscribe.
`unwatched` ones are streamed but followed by nobody, so a client can subscribe to one mid-fault
(`first_live_tick`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import redis

from shared.names import Names
from shared.tick import Tick, encode_tick
from tests.conftest import API_KEY, Cluster
from tests.support.client import open_native, send_json, until
from tests.support.procs import Proc
from tests.support.witness import Witness

__all__ = ["BusRig", "Outcome", "ReadyWatch", "first_live_tick", "store_ticks"]


@dataclass
class Outcome:
    flow: float  # worst over witnesses and streamed symbols: fault -> the first tick made after it
    pause: float  # longest silence of any streamed symbol on any witness around the fault
    silent_gaps: int
    duplicates: int
    resets: int
    reconnects: int
    findings: str

    def line(self, scenario: str) -> str:
        return (f"BUS {scenario}: every symbol flows again {self.flow:.2f}s after the fault, longest "
                f"pause of a symbol {self.pause:.2f}s, silent gaps {self.silent_gaps}, "
                f"duplicates {self.duplicates}, resets {self.resets}, client reconnects {self.reconnects}")


@dataclass
class BusRig:
    cluster: Cluster
    symbols: list[str]
    quiet: list[str] = field(default_factory=list)
    unwatched: list[str] = field(default_factory=list)
    edges: list[tuple[Proc, int]] = field(default_factory=list)
    ingestors: list[Proc] = field(default_factory=list)
    witnesses: list[Witness] = field(default_factory=list)

    async def start(self, rate: float = 20.0, leader_ttl: float = 2.0) -> None:
        # Quiet symbols are configured, so edges serve them, and carried but never quoted.
        self.cluster.simfeed(rate=rate, quiet=self.quiet)
        streamed = ",".join([*self.symbols, *self.unwatched, *self.quiet])
        self.ingestors = [self.cluster.ingestor(streamed, FXPROXY_NODE_ID=f"ing-{i}",
                                                FXPROXY_LEADER_TTL=str(leader_ttl))
                          for i in range(2)]
        self.edges = [self.cluster.edge(FXPROXY_EDGE_ID=f"edge-{i}") for i in range(2)]
        half = len(self.symbols) // 2
        plan = [(0, self.symbols), (1, self.symbols), (0, self.symbols[:half]), (1, self.symbols[half:])]
        for i, (edge, symbols) in enumerate(plan):
            urls = [f"ws://127.0.0.1:{self.edges[e][1]}/v1/stream" for e in (edge, 1 - edge)]
            w = Witness(urls, API_KEY, [*symbols, *self.quiet], name=f"w{i}@edge{edge}")
            self.witnesses.append(w)
            w.start()
        waited = await self.wait_flowing(time.monotonic(), 20, [*self.symbols, *self.quiet])
        assert waited < 20, "witnesses never got ticks of every symbol:\n" + self.report()
        await asyncio.sleep(1.0)  # clean ticks before the fault

    async def wait_flowing(self, after: float, timeout: float, symbols: list[str] | None = None) -> float:
        """Seconds until every witness had a tick of every (streamed) symbol after `after`."""
        watched = set(self.symbols if symbols is None else symbols)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = time.monotonic()
            if all(not watched.intersection(w.stale_symbols(t, t - after)) for w in self.witnesses):
                return t - after
            await asyncio.sleep(0.05)
        return time.monotonic() - after

    async def measure(self, fault_at: float, timeout: float = 30.0, settle: float = 2.0,
                      stop: bool = True) -> Outcome:
        """The figures since `fault_at` (totals since the start); `stop=False` keeps the
        witnesses running for a second fault."""
        await self.wait_flowing(fault_at, timeout)
        await asyncio.sleep(settle)
        if stop:
            for w in self.witnesses:
                await w.stop()
        return Outcome(
            flow=max(symbol_flow(w, s, fault_at) for w in self.witnesses for s in w.symbols
                     if s in self.symbols),
            pause=self.pause(self.symbols, fault_at - 1.0),
            silent_gaps=sum(len(w.silent_gaps) for w in self.witnesses),
            duplicates=sum(len(w.duplicates) for w in self.witnesses),
            resets=sum(w.resets for w in self.witnesses),
            reconnects=sum(w.reconnects for w in self.witnesses),
            findings=self.report(),
        )

    def pause(self, symbols: list[str], start: float) -> float:
        """Longest time any witness went without a tick of one of `symbols`, from `start` on."""
        return max((symbol_pause(w, s, start) for w in self.witnesses for s in symbols
                    if s in w.symbols), default=0.0)

    def resets(self, symbols: list[str], after: float = float("-inf")) -> int:
        """Reset frames any witness got for one of `symbols` after `after`."""
        return sum(1 for w in self.witnesses for e in w.events
                   if e.kind == "reset" and e.symbol in symbols and e.t > after)

    def arrived(self, symbol: str, position: tuple[str, int]) -> float:
        """When the last witness got `symbol` at `position` (monotonic), or inf."""
        times = [next((e.t for e in w.events if e.kind == "tick" and e.symbol == symbol
                       and e.position == position and e.outcome != "duplicate"), float("inf"))
                 for w in self.witnesses]
        return max(times)

    def report(self) -> str:
        return "\n".join(f"{w.summary()}\n{w.findings()}" for w in self.witnesses)

    async def stop(self) -> None:
        for w in self.witnesses:
            if w.running:
                await w.stop()


def symbol_flow(w: Witness, symbol: str, after: float) -> float:
    """Seconds from `after` until `symbol`'s first tick the vendor made after it reached `w`."""
    wall_ms = (after + w.wall_offset) * 1000
    for e in w.events:
        if e.kind == "tick" and e.symbol == symbol and e.t > after and isinstance(e.detail, dict) \
                and not e.detail.get("snapshot") and e.detail.get("ts", 0) > wall_ms:
            return e.t - after
    return float("inf")


def symbol_pause(w: Witness, symbol: str, start: float) -> float:
    """Longest gap between `symbol`'s ticks at `w` from `start` on (start itself counts)."""
    times = [start] + [e.t for e in w.events if e.kind == "tick" and e.symbol == symbol and e.t > start]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def store_ticks(port: int, names: Names, symbol: str, epoch: str, seqs: range, replicas: int,
                last: bool = True) -> None:
    """Write ticks into `symbol`'s history (and its last value, with `last`) on the primary at
    `port`, without publishing them, and wait until `replicas` replicas have them (a failover
    keeps them). Leave the last value alone for ticks written once ingestors run: a last value
    that moves past an ingestor's memory tells it another process numbered ticks, and its queue
    is dropped at its next term."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        for seq in seqs:
            payload = encode_tick(Tick(symbol, 1.0, 1.1, 1.05, int(time.time() * 1000), epoch, seq))
            client.xadd(names.history(symbol), {"p": payload}, id=f"{seq}-0")
            if last and names.cluster:
                client.set(names.last_value(symbol), payload)
            elif last:
                client.hset(names.last, symbol, payload)
        acked = client.execute_command("WAIT", replicas, 5000)
        assert acked >= replicas, f"only {acked} of {replicas} replicas took the ticks"
    finally:
        client.close()


class ReadyWatch:
    """Polls the edges' /readyz every 0.1 s in the background; `failures` lists (edge port,
    answer, seconds since start) for every answer that was not 200."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.failures: list[tuple[int, int | str, float]] = []
        self.polls = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        started = time.monotonic()
        while True:
            answers = await asyncio.gather(*(asyncio.to_thread(_status, p) for p in self.ports))
            self.polls += 1
            self.failures += [(p, a, round(time.monotonic() - started, 2))
                              for p, a in zip(self.ports, answers, strict=True) if a != 200]
            await asyncio.sleep(0.1)


def _status(port: int) -> int | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(exc).__name__


async def first_live_tick(port: int, symbol: str, timeout: float = 10.0) -> float:
    """Subscribe a new client of the edge at `port` to `symbol`: seconds from the subscribe to
    its first live (not snapshot) tick."""
    async with await open_native(port, API_KEY) as ws:
        started = time.monotonic()
        await send_json(ws, {"op": "subscribe", "symbols": [symbol], "id": 1})
        await until(ws, lambda m: m.get("type") == "tick" and m["symbol"] == symbol
                    and not m.get("snapshot"), timeout)
        return time.monotonic() - started
