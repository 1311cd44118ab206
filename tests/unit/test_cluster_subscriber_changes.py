"""The cluster subscriber against fake nodes (each connection a fake PubSub, the slot map the
test's): subscription changes from the hub and from its own repair, one command at a time, what is
subscribed ends equal to what is wanted; a node lost, hung or away holds up only its own symbols."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.cluster_subscriber import ClusterSubscriber
from shared.names import Names
from shared.pubsub_liveness import ANSWER_DEADLINE, PING_INTERVAL
from shared.redis_url import parse_redis_url
from shared.slot_map import Address, SlotMap, load_slot_map

N1, N2, N3 = ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)
SYMBOLS = [f"S{i:02d}" for i in range(40)]
NAMES = Names(cluster=True)
CONTROL_SLOT = key_slot(NAMES.control.encode())  # 10453: the upper half's node holds control


def slot(symbol: str) -> int:
    return key_slot(NAMES.tick_channel(symbol).encode())


LOW = [s for s in SYMBOLS if slot(s) < 8192]  # on N1
HIGH = [s for s in SYMBOLS if slot(s) >= 8192]  # on N2, with control


class _Commands:
    """What every fake connection of one subscriber shares: how many commands overlap."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent = 0
        self.started = asyncio.Event()


class _Node:
    """One fake Redis node: `down` refuses and drops connections, `hung` answers nothing."""

    def __init__(self) -> None:
        self.down = False
        self.hung = False
        self.conns: list[_FakePubSub] = []

    async def answer(self) -> None:
        if self.down:
            raise RedisConnectionError("connection refused")
        if self.hung:
            await asyncio.sleep(3600)


class _FakePubSub:
    def __init__(self, node: _Node, commands: _Commands) -> None:
        self.node = node
        self._commands = commands
        self.channels: set[bytes] = set()
        self.closed = False
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        node.conns.append(self)

    @property
    def live(self) -> bool:
        return not self.closed and not self.node.down

    async def connect(self) -> None:
        await self.node.answer()

    async def ping(self, token: bytes) -> None:
        if self.node.down:
            raise RedisConnectionError("connection reset")
        if not self.node.hung:
            self._inbox.put_nowait({"type": "pong", "data": token})

    async def _command(self, kind: str, channels: tuple[str, ...]) -> None:
        c = self._commands
        c.in_flight += 1
        c.most_in_flight = max(c.most_in_flight, c.in_flight)
        c.sent += 1
        c.started.set()
        try:
            await asyncio.sleep(c.latency)
            await self.node.answer()
            change = self.channels.discard if kind.endswith("unsubscribe") else self.channels.add
            for channel in channels:
                change(channel.encode())
                self._inbox.put_nowait({"type": kind, "channel": channel.encode(), "data": 1})
        finally:
            c.in_flight -= 1

    async def ssubscribe(self, *channels: str) -> None:
        assert len({key_slot(c.encode()) for c in channels}) == 1  # as the server demands
        await self._command("ssubscribe", channels)

    async def sunsubscribe(self, *channels: str) -> None:
        await self._command("sunsubscribe", channels)

    async def subscribe(self, *channels: str) -> None:
        await self._command("subscribe", channels)

    def push(self, msg: dict[str, Any]) -> None:
        self._inbox.put_nowait(msg)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if self.node.down:
            raise RedisConnectionError("connection lost")
        try:
            return await asyncio.wait_for(self._inbox.get(), min(timeout, 0.05))
        except TimeoutError:
            return None

    async def aclose(self) -> None:
        self.closed = True
        self.channels.clear()


class _FakeClient:
    def __init__(self, node: _Node, commands: _Commands) -> None:
        self._node, self._commands = node, commands

    def pubsub(self) -> _FakePubSub:
        return _FakePubSub(self._node, self._commands)

    async def aclose(self) -> None:
        pass


class _Subscriber(ClusterSubscriber):
    """Fake nodes behind the real subscriber; `spans` is the slot map every node reports."""

    def __init__(self, commands: _Commands, on_state: Callable[[bool], None],
                 resubscribed: list[str] | None = None, away: list[list[str]] | None = None) -> None:
        super().__init__(parse_redis_url("redis+cluster://127.0.0.1:1"), NAMES,
                         lambda s, d: None, lambda d: None, on_state,
                         None if resubscribed is None else resubscribed.extend,
                         None if away is None else lambda nodes: away.append(list(nodes)))
        self.commands = commands
        self.fake: dict[Address, _Node] = {N1: _Node(), N2: _Node(), N3: _Node()}
        self.spans: list[tuple[int, int, Address]] = [(0, 8191, N1), (8192, 16383, N2)]

    async def _query_slots(self, address: Address) -> list[list[Any]]:
        await self.fake[address].answer()
        return [[lo, hi, [host.encode(), port, b"id"]] for lo, hi, (host, port) in self.spans]

    def _client(self, host: str, port: int, timeout: float | None) -> Any:
        return _FakeClient(self.fake[host, port], self.commands)

    def live_channels(self) -> set[bytes]:
        return {c for node in self.fake.values() for p in node.conns if p.live for c in p.channels
                if c != NAMES.control.encode()}


def _channels(symbols: list[str]) -> set[bytes]:
    return {NAMES.tick_channel(s).encode() for s in symbols}


async def _settle(sub: _Subscriber, wanted: list[str], timeout: float = 5.0) -> float:
    """Seconds until what is subscribed is what is wanted and nothing is on its way."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while sub.live_channels() != _channels(wanted) or sub.commands.in_flight:
        assert loop.time() - started < timeout, sorted(sub.live_channels() ^ _channels(wanted))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # and it stays so
    assert sub.live_channels() == _channels(wanted)
    return loop.time() - started


async def _until(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until `predicate()` holds (polled: the fakes have no events to wait on)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout
        await asyncio.sleep(0.001)
    return time.monotonic() - started


async def _timed(call: Awaitable[None]) -> float:
    started = time.monotonic()
    await call
    return time.monotonic() - started


async def _stop(running: asyncio.Task[None]) -> None:
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


async def test_an_unsubscribe_during_a_repair_is_not_undone_and_commands_never_overlap() -> None:
    states: list[bool] = []
    resubscribed: list[str] = []
    commands = _Commands(latency=0.01)
    sub = _Subscriber(commands, states.append, resubscribed)
    running = asyncio.create_task(sub.run())
    await sub.subscribe(SYMBOLS)
    await _settle(sub, SYMBOLS)
    assert states == [True]

    # N2's connection fails: the repair subscribes its symbols again, one slot a command,
    # while the hub drops half of them and adds others.
    commands.started.clear()
    sub.fake[N2].down = True
    await asyncio.sleep(0.1)
    sub.fake[N2].down = False
    await commands.started.wait()  # the repair's first command is on its way
    dropped, added = SYMBOLS[::2], ["EXTRA1", "EXTRA2"]
    await asyncio.gather(sub.unsubscribe(dropped), sub.subscribe(added))
    wanted = [s for s in SYMBOLS if s not in dropped] + added
    took = await _settle(sub, wanted)
    print(f"settled {took:.2f}s after the repair and the hub's changes; "
          f"{commands.sent} commands, at most {commands.most_in_flight} at once")
    await _stop(running)

    assert states == [True, False, True, False]  # N2 held the control channel; then run() ended
    # One command at a time across every node connection.
    assert commands.most_in_flight == 1
    assert took < 3.0
    # Only N2's symbols that are still wanted were lost, and each is refilled once.
    assert sorted(resubscribed) == sorted(s for s in HIGH if s not in dropped)


async def test_hub_changes_racing_each_other_end_in_the_wanted_set() -> None:
    commands = _Commands(latency=0.005)
    sub = _Subscriber(commands, lambda up: None)
    running = asyncio.create_task(sub.run())
    await sub.subscribe(SYMBOLS[:10])
    await _settle(sub, SYMBOLS[:10])
    # Subscribe and unsubscribe of the same symbols from several tasks at once.
    await asyncio.gather(sub.subscribe(SYMBOLS[10:30]), sub.unsubscribe(SYMBOLS[5:20]),
                         sub.subscribe(SYMBOLS[15:25]), sub.unsubscribe(SYMBOLS[:3]))
    wanted = [*SYMBOLS[3:5], *SYMBOLS[15:30]]
    took = await _settle(sub, wanted)
    print(f"settled {took:.2f}s; at most {commands.most_in_flight} commands at once")
    await _stop(running)
    assert commands.most_in_flight == 1 and took < 3.0


async def test_while_a_shard_is_away_new_symbols_on_live_shards_subscribe_at_once() -> None:
    """N1 (symbols only) goes down for good: the bus stays up, N1 is reported away, a symbol
    added on N2 is subscribed at once, and when N1's slots move to N3 only N1's symbols are
    refilled."""
    states: list[bool] = []
    resubscribed: list[str] = []
    away: list[list[str]] = []
    sub = _Subscriber(_Commands(latency=0.001), states.append, resubscribed, away)
    running = asyncio.create_task(sub.run())
    first = LOW[:5] + HIGH[:5]
    await sub.subscribe(first)
    await _settle(sub, first)
    sub.fake[N1].down = True
    await _until(lambda: bool(away), 5)
    took = await _timed(sub.subscribe([HIGH[5]]))
    took += await _until(lambda: not _channels([HIGH[5]]) - sub.live_channels(), 1)
    assert away == [["127.0.0.1:1"]] and sub.connected and states == [True]

    sub.spans = [(0, 8191, N3), (8192, 16383, N2)]  # the failover: N1's replica N3 takes over
    wanted = [*first, HIGH[5]]
    moved = await _settle(sub, wanted)
    await _stop(running)
    print(f"new symbol on a live shard subscribed {took * 1000:.1f} ms after the subscribe; "
          f"the away shard's symbols on their new primary {moved:.2f}s after the map changed")
    assert took < 0.1, took
    assert sorted(resubscribed) == sorted(LOW[:5])  # not N2's: they lost nothing
    assert away[-1] == [] and states == [True, False]  # False: run() ended


async def test_a_hung_node_is_found_by_its_missing_pongs_and_its_symbols_move() -> None:
    """A node that stops answering (SIGSTOP) keeps its socket open: only the missing pong
    shows it. Its symbols wait for the slot map to name another primary."""
    resubscribed: list[str] = []
    away: list[list[str]] = []
    sub = _Subscriber(_Commands(latency=0.001), lambda up: None, resubscribed, away)
    running = asyncio.create_task(sub.run())
    await sub.subscribe(LOW[:3] + HIGH[:3])
    await _settle(sub, LOW[:3] + HIGH[:3])
    hung_at = time.monotonic()
    sub.fake[N1].hung = True
    while not away:
        await asyncio.sleep(0.02)
        assert time.monotonic() - hung_at < 10
    noticed = time.monotonic() - hung_at
    sub.spans = [(0, 8191, N3), (8192, 16383, N2)]
    while sorted(resubscribed) != sorted(LOW[:3]):
        await asyncio.sleep(0.02)
        assert time.monotonic() - hung_at < 15
    moved = time.monotonic() - hung_at
    await _stop(running)
    print(f"hung node noticed after {noticed:.2f}s, its symbols resubscribed elsewhere after "
          f"{moved:.2f}s")
    # At most one ping interval before the ping that goes unanswered, then its deadline.
    assert ANSWER_DEADLINE - 0.1 <= noticed <= PING_INTERVAL + ANSWER_DEADLINE + 0.5
    assert moved - noticed < 1.5  # map reloads are not held up by tries of the hung node
    assert away[-1] == []


async def test_our_own_sunsubscribe_replies_and_other_nodes_pushes_are_not_losses() -> None:
    """A symbol toggled faster than the replies come back, and a `sunsubscribe` from a node that
    is not the symbol's home: neither ends a subscription nor takes the bus down."""
    states: list[bool] = []
    resubscribed: list[str] = []
    commands = _Commands(latency=0.0)
    sub = _Subscriber(commands, states.append, resubscribed)
    running = asyncio.create_task(sub.run())
    await sub.subscribe([LOW[0], HIGH[0]])
    await _settle(sub, [LOW[0], HIGH[0]])
    for _ in range(50):  # no await between: each reply arrives after the next command
        await sub.unsubscribe([LOW[0]])
        await sub.subscribe([LOW[0]])
    n2 = next(p for p in sub.fake[N2].conns if p.live)
    n2.push({"type": "sunsubscribe", "channel": NAMES.tick_channel(LOW[0]).encode(), "data": 0})
    await _settle(sub, [LOW[0], HIGH[0]])
    await asyncio.sleep(0.3)
    await _stop(running)
    assert states == [True, False] and resubscribed == []
    assert sub._ledger.pending_replies() == 0 and sub._ledger.home[LOW[0]] == N1


async def test_a_push_from_the_home_node_loses_that_symbol_alone() -> None:
    resubscribed: list[str] = []
    sub = _Subscriber(_Commands(latency=0.001), lambda up: None, resubscribed)
    running = asyncio.create_task(sub.run())
    await sub.subscribe([LOW[0], LOW[1]])
    await _settle(sub, [LOW[0], LOW[1]])
    n1 = next(p for p in sub.fake[N1].conns if p.live)
    n1.channels.discard(NAMES.tick_channel(LOW[0]).encode())  # the server ended it
    n1.push({"type": "sunsubscribe", "channel": NAMES.tick_channel(LOW[0]).encode(), "data": 0})
    await _settle(sub, [LOW[0], LOW[1]])
    await _stop(running)
    assert resubscribed == [LOW[0]]


async def test_a_subscriber_that_ends_reports_the_bus_down() -> None:
    states: list[bool] = []
    sub = _Subscriber(_Commands(latency=0.001), states.append)
    running = asyncio.create_task(sub.run())
    await sub.subscribe(SYMBOLS[:3])
    await _settle(sub, SYMBOLS[:3])
    await _stop(running)
    assert states == [True, False]
    assert not any(p.live for node in sub.fake.values() for p in node.conns)


async def test_a_slot_map_is_asked_of_the_last_maps_primaries_first_away_nodes_last() -> None:
    asked: list[Address] = []

    async def query(address: Address) -> list[list[Any]]:
        asked.append(address)
        if address == ("127.0.0.1", 7001):
            raise RedisConnectionError("away")
        return [[0, 8000, [b"127.0.0.1", 7002, b"id"]]]  # partial: taken as it is

    seeds = [("127.0.0.1", 7100), ("127.0.0.1", 7101)]
    known = SlotMap([(0, 8000, ("127.0.0.1", 7001)), (8001, 16383, ("127.0.0.1", 7002))])
    for _ in range(10):
        asked.clear()
        got = await load_slot_map(query, known, seeds, away={("127.0.0.1", 7001)})
        # The configured seeds (perhaps the ones that failed) only if no primary answers.
        assert asked == [("127.0.0.1", 7002)]
        assert got.owner(NAMES.tick_channel(LOW[0])) == ("127.0.0.1", 7002)
        assert got.owner(NAMES.tick_channel(HIGH[0])) is None
    sub = ClusterSubscriber(parse_redis_url("redis+cluster://127.0.0.1:7100"), NAMES,
                            lambda s, d: None, lambda d: None, lambda up: None)
    real = sub._client("127.0.0.1", 7100, timeout=2.0)
    kwargs = real.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2.0, ANSWER_DEADLINE)
    await real.aclose()
