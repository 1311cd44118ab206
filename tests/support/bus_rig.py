"""A pipeline under witnesses for bus failover tests: simfeed, two ingestors, two edges, and
Witness clients on both edges, on whatever bus URL (cluster or sentinel) the test gives.

`measure()` waits until every witness has a fresh tick of every symbol after a moment, watches a
little longer for late gaps and duplicates, then returns the figures the tests assert bounds on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from tests.conftest import API_KEY, Cluster
from tests.support.procs import Proc
from tests.support.witness import Witness

__all__ = ["BusRig", "Outcome"]


@dataclass
class Outcome:
    flow: float  # worst over witnesses and symbols: fault -> the symbol's first tick made after it
    pause: float  # longest silence of any symbol on any witness around the fault
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
    edges: list[tuple[Proc, int]] = field(default_factory=list)
    ingestors: list[Proc] = field(default_factory=list)
    witnesses: list[Witness] = field(default_factory=list)

    async def start(self, rate: float = 20.0, leader_ttl: float = 2.0) -> None:
        self.cluster.simfeed(rate=rate)
        self.ingestors = [self.cluster.ingestor(",".join(self.symbols), FXPROXY_NODE_ID=f"ing-{i}",
                                                FXPROXY_LEADER_TTL=str(leader_ttl))
                          for i in range(2)]
        self.edges = [self.cluster.edge(FXPROXY_EDGE_ID=f"edge-{i}") for i in range(2)]
        half = len(self.symbols) // 2
        plan = [(0, self.symbols), (1, self.symbols), (0, self.symbols[:half]), (1, self.symbols[half:])]
        for i, (edge, symbols) in enumerate(plan):
            urls = [f"ws://127.0.0.1:{self.edges[e][1]}/v1/stream" for e in (edge, 1 - edge)]
            w = Witness(urls, API_KEY, symbols, name=f"w{i}@edge{edge}")
            self.witnesses.append(w)
            w.start()
        waited = await self.wait_flowing(time.monotonic(), 20)
        assert waited < 20, "witnesses never got ticks of every symbol:\n" + self.report()
        await asyncio.sleep(1.0)  # clean ticks before the fault

    async def wait_flowing(self, after: float, timeout: float) -> float:
        """Seconds until every witness had a tick of every symbol after `after` (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = time.monotonic()
            if all(not w.stale_symbols(t, t - after) for w in self.witnesses):
                return t - after
            await asyncio.sleep(0.05)
        return time.monotonic() - after

    async def measure(self, fault_at: float, timeout: float = 30.0, settle: float = 2.0) -> Outcome:
        await self.wait_flowing(fault_at, timeout)
        await asyncio.sleep(settle)
        for w in self.witnesses:
            await w.stop()
        return Outcome(
            flow=max(symbol_flow(w, s, fault_at) for w in self.witnesses for s in w.symbols),
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
