"""The single-Redis / Sentinel subscriber against a fake Redis: symbols the hub subscribes while
it (re)connects are not lost, a Redis that stops answering is noticed by its missing pongs and
reconnected to once it answers, and the subscriber's own client is closed when it ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from shared.names import Names
from shared.pubsub_liveness import ANSWER_DEADLINE, PING_INTERVAL
from shared.redis_subscriber import RETRY_MAX, RedisSubscriber

NAMES = Names()


class _Redis:
    """One fake Redis: `hung` answers nothing; `latency` delays each subscription command."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.hung = False
        self.pubsubs: list[_PubSub] = []
        self.closed = False

    def pubsub(self, ignore_subscribe_messages: bool = False) -> _PubSub:
        pubsub = _PubSub(self)
        self.pubsubs.append(pubsub)
        return pubsub

    async def aclose(self) -> None:
        self.closed = True

    def live(self) -> _PubSub | None:
        return next((p for p in reversed(self.pubsubs) if not p.closed), None)


class _PubSub:
    def __init__(self, redis: _Redis) -> None:
        self._redis = redis
        self.channels: set[str] = set()
        self.closed = False
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def _answer(self) -> None:
        await asyncio.sleep(self._redis.latency)
        while self._redis.hung:  # noqa: ASYNC110 - polled like a socket, no event to wait on
            await asyncio.sleep(0.01)

    async def subscribe(self, *channels: str) -> None:
        await self._answer()
        self.channels.update(channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._answer()
        self.channels.difference_update(channels)

    async def ping(self, token: bytes) -> None:
        self._inbox.put_nowait({"type": "pong", "data": token})

    async def check_health(self) -> None:
        pass

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if self.closed:
            raise RedisConnectionError("closed")
        if self._redis.hung:
            await asyncio.sleep(min(timeout, 0.05))
            return None
        try:
            return await asyncio.wait_for(self._inbox.get(), min(timeout, 0.05))
        except TimeoutError:
            return None

    async def aclose(self) -> None:
        self.closed = True


def _ticks(symbols: list[str]) -> set[str]:
    return {NAMES.tick_channel(s) for s in symbols}


async def _until(predicate: Any, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_a_symbol_subscribed_while_it_connects_is_subscribed_once_it_has() -> None:
    redis = _Redis(latency=0.1)  # the first SUBSCRIBE takes a while: the hub acts meanwhile
    states: list[bool] = []
    sub = RedisSubscriber(redis, NAMES, lambda s, d: None, lambda d: None, states.append)  # type: ignore[arg-type]
    await sub.subscribe(["EURUSD"])
    running = asyncio.create_task(sub.run())
    await asyncio.sleep(0.05)  # run() is awaiting its SUBSCRIBE
    await sub.subscribe(["GBPUSD"])
    await sub.unsubscribe(["EURUSD"])
    wanted = {NAMES.control, *_ticks(["GBPUSD"])}
    took = await _until(lambda: (p := redis.live()) is not None and p.channels == wanted, 2)
    await asyncio.sleep(0.2)
    live = redis.live()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    print(f"subscriptions made during the connect in place {took:.2f}s later")
    assert live is not None and live.channels == wanted
    assert states == [True, False]


async def test_a_hung_redis_is_noticed_and_reconnected_soon_after_it_answers() -> None:
    redis = _Redis()
    states: list[tuple[float, bool]] = []
    resubscribed: list[list[str]] = []
    sub = RedisSubscriber(redis, NAMES, lambda s, d: None, lambda d: None,  # type: ignore[arg-type]
                          lambda up: states.append((time.monotonic(), up)),
                          lambda symbols: resubscribed.append(sorted(symbols)))
    await sub.subscribe(["EURUSD", "GBPUSD"])
    running = asyncio.create_task(sub.run())
    await _until(lambda: states == [(states[0][0], True)] if states else False, 2)
    hung_at = time.monotonic()
    redis.hung = True  # SIGSTOP: the socket stays open, nothing answers
    await _until(lambda: len(states) == 2, 10)
    noticed = states[1][0] - hung_at
    await asyncio.sleep(2.5 * ANSWER_DEADLINE)  # attempts that time out meanwhile
    redis.hung = False
    woke = time.monotonic()
    await _until(lambda: len(states) == 3, 5)
    resumed = states[2][0] - woke
    attempts = len(redis.pubsubs) - 1
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    print(f"hung Redis noticed after {noticed:.2f}s; {attempts} connect attempts while hung; "
          f"up again {resumed:.2f}s after it answered")
    assert [up for _, up in states] == [True, False, True, False]
    assert ANSWER_DEADLINE - 0.1 <= noticed <= PING_INTERVAL + ANSWER_DEADLINE + 0.5
    # Attempts time out and are tried again, each a deadline long: a waking Redis answers the
    # one pending, or the next, within a retry pause.
    assert attempts >= 2
    assert resumed <= RETRY_MAX + 0.3, resumed
    assert resubscribed == [["EURUSD", "GBPUSD"]] * 2  # the first connect and the one after
    assert redis.closed  # its own client: closed when run() ends (a Sentinel client holds
    # connections to the sentinels too)
