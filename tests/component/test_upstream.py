"""The ingestor's upstream side against in-process vendor stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from fxproxy.simfeed import PAIRS, SimFeed
from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.vendors.base import Hooks
from ingestor.vendors.tradermade import TraderMadeSession
from shared.tick import Quote

Handler = Callable[[ServerConnection], Awaitable[None]]


@contextlib.asynccontextmanager
async def vendor(handler: Handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"


def tick(symbol: str = "EURUSD", bid: float = 1.1) -> str:
    return orjson.dumps({"symbol": symbol, "ts": "1732186000000", "bid": bid, "ask": bid + 0.0001,
                         "mid": bid + 0.00005}).decode()


async def run_upstream(url: str, quotes: list[Quote], **kw: object) -> asyncio.Task[None]:
    up = TraderMadeSession([url], "secret", ["EURUSD"], Hooks(quotes.append),
                  backoff=Backoff(0.05, 0.1), **kw)  # type: ignore[arg-type]
    return asyncio.create_task(up.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_login_carries_custom_headers_and_symbols() -> None:
    seen: dict[str, object] = {}

    async def handler(ws: ServerConnection) -> None:
        seen["header"] = ws.request.headers.get("X-Vendor-Token") if ws.request else None
        await ws.send("Connected")
        seen["login"] = orjson.loads(await ws.recv())
        await ws.send(tick())
        await ws.wait_closed()

    quotes: list[Quote] = []
    async with vendor(handler) as url:
        task = await run_upstream(url, quotes, headers={"X-Vendor-Token": "t0k"})
        for _ in range(100):
            if quotes:
                break
            await asyncio.sleep(0.02)
        await stop(task)
    assert seen == {"header": "t0k", "login": {"userKey": "secret", "symbol": "EURUSD"}}
    assert quotes and quotes[0].symbol == "EURUSD"


async def test_malformed_messages_are_counted_and_skipped_not_fatal() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("Connected")
        await ws.recv()
        for raw in ('{"symbol":"EURUSD","bid":"x"}', "{oops", tick(bid=1.2), '{"symbol":1}', tick(bid=1.3)):
            await ws.send(raw)
        await ws.wait_closed()

    before = metrics.MALFORMED._value.get()
    quotes: list[Quote] = []
    async with vendor(handler) as url:
        task = await run_upstream(url, quotes)
        for _ in range(100):
            if len(quotes) == 2:
                break
            await asyncio.sleep(0.02)
        await stop(task)
    assert [q.bid for q in quotes] == [1.2, 1.3]
    assert metrics.MALFORMED._value.get() - before == 3


async def test_silent_upstream_is_dropped_and_reconnected() -> None:
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.send("Connected")
        await ws.recv()
        if connections == 1:
            await ws.send(tick())
            await ws.wait_closed()  # then goes quiet without closing: a half-dead feed
        else:
            await ws.send(tick(bid=1.5))
            await ws.wait_closed()

    quotes: list[Quote] = []
    async with vendor(handler) as url:
        task = await run_upstream(url, quotes, silence_timeout=0.3)
        for _ in range(150):
            if len(quotes) == 2:
                break
            await asyncio.sleep(0.02)
        await stop(task)
    assert connections == 2
    assert [q.bid for q in quotes] == [1.1, 1.5]


@pytest.fixture
async def simfeed() -> AsyncIterator[str]:
    feed = SimFeed("right-key", rate=50, seed=1)
    port = await feed.start("127.0.0.1", 0)
    yield f"ws://127.0.0.1:{port}/"
    await feed.close()


async def test_simfeed_refuses_a_wrong_user_key_clearly(simfeed: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(simfeed) as ws:
        assert await ws.recv() == "Connected"
        await ws.send(orjson.dumps({"userKey": "wrong", "symbol": "EURUSD"}).decode())
        assert await ws.recv() == "Invalid user key"
        await asyncio.wait_for(ws.wait_closed(), 2)
    assert ws.close_code == 1008


async def test_simfeed_streams_random_walk_quotes_with_bid_below_ask(simfeed: str) -> None:
    assert len(PAIRS) >= 15 and {"EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCAD"} <= set(PAIRS)
    quotes: list[Quote] = []
    up = TraderMadeSession([simfeed], "right-key", ["EURUSD", "USDJPY", "NOSUCH"], Hooks(quotes.append))
    task = asyncio.create_task(up.run())
    for _ in range(200):
        if len(quotes) >= 40:
            break
        await asyncio.sleep(0.02)
    await stop(task)
    assert len(quotes) >= 40
    assert {q.symbol for q in quotes} == {"EURUSD", "USDJPY"}
    assert all(q.bid < q.ask for q in quotes)
    assert len({q.bid for q in quotes if q.symbol == "EURUSD"}) > 1  # it moves


class RecordingBackoff(Backoff):
    """Jitter off (every delay is its ceiling), and each delay asked for is recorded: the test
    reads what the session chose, not wall-clock gaps a loaded machine stretches."""

    def __init__(self, initial: float, maximum: float) -> None:
        super().__init__(initial, maximum)
        self.delays: list[float] = []

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt += 1
        self.delays.append(ceiling)
        return ceiling


async def reconnect_delays(deliver: bool, sessions: int = 4) -> list[float]:
    """The backoff delays a session chose between a vendor's connections when each ends after (or
    without) a quote."""
    connected = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connected
        connected += 1
        await ws.send("Connected")
        await ws.recv()
        if deliver:
            await ws.send(tick())
            await asyncio.sleep(0.05)
        await ws.close()  # the vendor drops us

    quotes: list[Quote] = []
    backoff = RecordingBackoff(0.05, 5.0)
    async with vendor(handler) as url:
        up = TraderMadeSession([url], "secret", ["EURUSD"], Hooks(quotes.append), backoff=backoff)
        task = asyncio.create_task(up.run())
        for _ in range(500):
            if connected >= sessions:
                break
            await asyncio.sleep(0.02)
        await stop(task)
    assert connected >= sessions
    return backoff.delays[: sessions - 1]


async def test_reconnect_delay_starts_over_after_a_login_that_delivered_quotes() -> None:
    good = await reconnect_delays(deliver=True)
    bad = await reconnect_delays(deliver=False)
    # Without the reset after a good login the delays would grow: 0.05, 0.1, 0.2.
    assert good == [0.05, 0.05, 0.05], f"delays after good logins grew: {good}"
    assert bad == [0.05, 0.1, 0.2], f"failed logins must still back off exponentially: {bad}"
