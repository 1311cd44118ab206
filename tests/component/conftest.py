"""A real edge in this process, on the in-memory bus, reached over loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from edge.app import EdgeApp
from shared.bus import Message
from shared.keystore import KeyRecord, MemoryKeyStore, hash_key
from shared.memory_bus import MemoryBus
from shared.settings import EdgeSettings
from shared.tick import Tick, encode_tick

STATIC_KEY = "static-test-key"


@dataclass
class Edge:
    app: EdgeApp
    bus: MemoryBus
    store: MemoryKeyStore
    port: int
    seqs: dict[str, int] = field(default_factory=dict)
    epoch: str = "e1"

    async def tick(self, symbol: str = "EURUSD", n: int = 1) -> list[int]:
        """Publish `n` ticks for a symbol, as the ingestor would; return their seqs."""
        out = []
        for _ in range(n):
            seq = self.seqs.get(symbol, 0) + 1
            self.seqs[symbol] = seq
            tick = Tick(symbol, 1.1, 1.2, 1.15, 1732186000000 + seq, self.epoch, seq)
            await self.bus.publish([Message(symbol, seq, encode_tick(tick))])
            out.append(seq)
        return out

    async def add_key(self, key: str, name: str, **kw: Any) -> None:
        await self.store.create(hash_key(key), KeyRecord(name, **kw))


StartEdge = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def start_edge() -> AsyncIterator[StartEdge]:
    """Start edges with setting overrides; symbols EURUSD, GBPUSD, USDJPY have ticked once."""
    started: list[Edge] = []

    async def start(**overrides: Any) -> Edge:
        settings = EdgeSettings(
            host="127.0.0.1", port=0, api_keys=[STATIC_KEY], log_format="console",
            **{"handshake_timeout": 2.0, "auth_timeout": 2.0, **overrides},
        )
        bus, store = MemoryBus(), MemoryKeyStore()
        app = EdgeApp(settings, bus, store)
        edge = Edge(app, bus, store, await app.start())
        started.append(edge)
        for symbol in ("EURUSD", "GBPUSD", "USDJPY"):
            await edge.tick(symbol)
        return edge

    yield start
    for edge in started:
        await edge.app.stop(drain_timeout=0)
        await edge.bus.close()


@pytest.fixture
async def edge(start_edge: StartEdge) -> Edge:
    return await start_edge()
