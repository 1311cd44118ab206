"""The cluster subscriber's subscription changes, from the hub and from its own repair, with fake
per-node PubSubs: one command at a time, and what is subscribed ends equal to what is wanted."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.crc import key_slot

from shared.cluster_subscriber import ClusterSubscriber
from shared.names import Names
from shared.redis_url import parse_redis_url

NODES = (("127.0.0.1", 1), ("127.0.0.1", 2))
SYMBOLS = [f"S{i:02d}" for i in range(40)]
NAMES = Names(cluster=True)


class _Commands:
    """What every fake PubSub of one subscriber shares: how many commands overlap."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent = 0
        self.started = asyncio.Event()


class _FakePubSub:
    def __init__(self, commands: _Commands) -> None:
        self._commands = commands
        self.channels: set[bytes] = set()
        self.broken = False

    @property
    def subscribed(self) -> bool:
        return bool(self.channels)

    async def _command(self, add: tuple[str, ...], remove: tuple[str, ...]) -> None:
        c = self._commands
        c.in_flight += 1
        c.most_in_flight = max(c.most_in_flight, c.in_flight)
        c.sent += 1
        c.started.set()
        try:
            await asyncio.sleep(c.latency)
            self.channels.update(x.encode() for x in add)
            self.channels.difference_update(x.encode() for x in remove)
        finally:
            c.in_flight -= 1

    async def ssubscribe(self, *channels: str) -> None:
        assert len({key_slot(c.encode()) for c in channels}) == 1  # as the server demands
        await self._command(channels, ())

    async def sunsubscribe(self, *channels: str) -> None:
        await self._command((), channels)

    async def subscribe(self, *channels: str) -> None:
        await self._command(channels, ())

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        await asyncio.sleep(0.01)
        if self.broken:
            raise ConnectionError("node lost")
        return None

    async def check_health(self) -> None:
        pass

    async def aclose(self) -> None:
        self.channels.clear()


class _FakeClient:
    def __init__(self, pubsub: _FakePubSub) -> None:
        self._pubsub = pubsub

    def pubsub(self) -> _FakePubSub:
        return self._pubsub


class _Subscriber(ClusterSubscriber):
    """Two primaries, half the slots each; every node connection is a fake PubSub."""

    def __init__(self, commands: _Commands, on_state: Any) -> None:
        super().__init__(parse_redis_url("redis+cluster://127.0.0.1:1"), NAMES,
                         lambda s, d: None, lambda d: None, on_state)
        self.commands = commands
        self.pubsubs: list[tuple[tuple[str, int], _FakePubSub]] = []

    async def _load_slots(self) -> None:
        await asyncio.sleep(0.001)
        self._slots = [(0, 8191, NODES[0]), (8192, 16383, NODES[1])]

    def _client(self, host: str, port: int, timeout: float | None) -> Any:
        pubsub = _FakePubSub(self.commands)
        self.pubsubs.append(((host, port), pubsub))
        return _FakeClient(pubsub)

    def live_channels(self) -> set[bytes]:
        live = [p for _, p in self.pubsubs if not p.broken]
        return {c for p in live for c in p.channels if c != NAMES.control.encode()}


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


async def test_an_unsubscribe_during_a_repair_is_not_undone_and_commands_never_overlap() -> None:
    states: list[bool] = []
    commands = _Commands(latency=0.01)
    sub = _Subscriber(commands, states.append)
    running = asyncio.create_task(sub.run())
    await sub.subscribe(SYMBOLS)
    await _settle(sub, SYMBOLS)
    assert states == [True]

    # Node 2's connection fails: the repair subscribes its symbols again, one slot a command,
    # while the hub drops half of them and adds others.
    lost_node = next(p for a, p in sub.pubsubs if a == NODES[1])
    commands.started.clear()
    lost_node.broken = True
    await commands.started.wait()  # the repair's first command is on its way
    dropped, added = SYMBOLS[::2], ["EXTRA1", "EXTRA2"]
    await asyncio.gather(sub.unsubscribe(dropped), sub.subscribe(added))
    wanted = [s for s in SYMBOLS if s not in dropped] + added
    took = await _settle(sub, wanted)
    print(f"settled {took:.2f}s after the repair and the hub's changes; "
          f"{commands.sent} commands, at most {commands.most_in_flight} at once")
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)

    assert states == [True, False, True]
    # One command at a time across every node connection (a PubSub takes one at a time).
    assert commands.most_in_flight == 1
    assert took < 3.0


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
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert commands.most_in_flight == 1 and took < 3.0


class _SlotsReply:
    def __init__(self, asked: list[tuple[str, int]], address: tuple[str, int]) -> None:
        self._asked, self._address = asked, address

    async def execute_command(self, *args: str) -> list[list[Any]]:
        self._asked.append(self._address)
        return [[0, 16383, [b"127.0.0.1", 7001, b"id"]]]

    async def aclose(self) -> None:
        pass


async def test_a_slot_map_is_asked_of_the_last_maps_primaries_first_with_a_short_connect() -> None:
    asked: list[tuple[str, int]] = []
    target = parse_redis_url("redis+cluster://127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102")
    sub = ClusterSubscriber(target, NAMES, lambda s, d: None, lambda d: None, lambda up: None)
    real = sub._client("127.0.0.1", 7100, timeout=2.0)
    kwargs = real.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2.0, 2.0)
    await real.aclose()
    sub._client = lambda host, port, timeout: _SlotsReply(asked, (host, port))  # type: ignore[method-assign,assignment,return-value]
    sub._slots = [(0, 16383, ("127.0.0.1", 7001))]  # the last map: its primary is not a seed
    sub._seeds = [*target.nodes, ("127.0.0.1", 7001)]
    for _ in range(10):
        await sub._load_slots()
    # The configured seeds (perhaps the ones that failed) are asked only if it does not answer.
    assert asked == [("127.0.0.1", 7001)] * 10
