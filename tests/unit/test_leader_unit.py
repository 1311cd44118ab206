"""The lease loops against a fake lease: every call has a deadline, so a hung Redis holds neither."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from ingestor.app import LostLeadership, _campaign, _hold, _start_term, _State, term_of
from shared.bus import Message
from shared.memory_bus import MemoryBus
from shared.settings import IngestorSettings
from shared.tick import Quote, Tick, encode_tick

TTL = 0.6


class FakeLease:
    """A Leadership whose claims answer what `answer` says, or hang while `hung` is set."""

    fence = "n.proc"

    def __init__(self, answer: Callable[[], str | None] = lambda: "n.proc:1.x") -> None:
        self.answer = answer
        self.hung = False
        self.calls: list[float] = []

    async def claim(self) -> str | None:
        self.calls.append(asyncio.get_running_loop().time())
        if self.hung:
            await asyncio.Event().wait()  # Redis stopped: no reply, no error
        return self.answer()

    async def release(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[object, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        result: object = await call()
    except LostLeadership as exc:
        result = exc
    return result, loop.time() - started


async def test_campaign_polls_through_a_hung_redis_and_wins_on_the_first_answer() -> None:
    lease = FakeLease()
    lease.hung = True
    campaign = asyncio.create_task(timed(lambda: _campaign(lease, TTL, asyncio.Event())))
    await asyncio.sleep(1.0)
    assert not campaign.done()
    assert len(lease.calls) >= 4, "each hung claim must be given up after ttl/3 and tried again"
    gaps = [b - a for a, b in itertools.pairwise(lease.calls)]
    assert max(gaps) < TTL / 3 + 0.1, f"a claim held the campaign for {max(gaps):.2f}s"
    answered = asyncio.get_running_loop().time()
    lease.hung = False
    won, _ = await asyncio.wait_for(campaign, 2)
    took = asyncio.get_running_loop().time() - answered
    assert isinstance(won, tuple) and won[0] == "n.proc:1.x"
    assert took < TTL / 3 + 0.1, f"won {took:.2f}s after the lease answered again"


async def test_campaign_stops_when_told_even_while_redis_hangs() -> None:
    lease = FakeLease()
    lease.hung = True
    stop = asyncio.Event()
    campaign = asyncio.create_task(timed(lambda: _campaign(lease, TTL, stop)))
    await asyncio.sleep(0.3)
    stop.set()
    result, _ = await asyncio.wait_for(campaign, 1)
    assert result is None


async def test_hold_stands_down_one_ttl_after_the_last_renewal_when_redis_hangs() -> None:
    lease = FakeLease()
    loop = asyncio.get_running_loop()
    claimed = loop.time()
    holding = asyncio.create_task(timed(lambda: _hold(lease, TTL, claimed)))
    await asyncio.sleep(0.5)  # renewals go through
    lease.hung = True
    renewed = max(c for c in lease.calls)
    result, _ = await asyncio.wait_for(holding, 3)
    lost_after = loop.time() - renewed
    assert isinstance(result, LostLeadership) and "could not renew" in str(result)
    assert TTL - 0.05 <= lost_after < TTL + 0.15, f"stood down {lost_after:.2f}s after the last renewal"


async def test_hold_stands_down_at_once_when_another_process_holds_the_lease() -> None:
    lease = FakeLease(answer=lambda: None)
    now = asyncio.get_running_loop().time()
    result, took = await asyncio.wait_for(timed(lambda: _hold(lease, TTL, now)), 2)
    assert isinstance(result, LostLeadership) and "another" in str(result)
    assert took < TTL / 3 + 0.1, f"stood down {took:.2f}s after taking the lease"  # the first renewal


async def test_hold_keeps_leading_through_a_new_term_of_its_own() -> None:
    tokens = iter(["n.proc:1.a", "n.proc:1.a", "n.proc:2.b", "n.proc:2.b", "n.proc:2.b"])
    lease = FakeLease(answer=lambda: next(tokens, "n.proc:2.b"))
    holding = asyncio.create_task(_hold(lease, TTL, asyncio.get_running_loop().time()))
    await asyncio.sleep(1.2)
    assert not holding.done(), "our own lease under a new term is still ours"
    holding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holding


def test_term_of_reads_the_term_number_of_a_token() -> None:
    assert term_of("node-1.ab12cd34:17.ff00aa11") == 17
    assert term_of("") is None


SETTINGS = IngestorSettings(upstream_urls=["ws://127.0.0.1:1/"], symbols=["EURUSD"], metrics_port=0,
                            leader_ttl=0.6)


async def test_ticks_left_unpublished_go_out_next_term_only_if_no_other_term_came_between() -> None:
    bus = MemoryBus()
    await bus.publish([Message("EURUSD", 1, encode_tick(Tick("EURUSD", 1.1, 1.2, 1.15, 1, "e1", 1)))])
    state = _State(bus, "n.p")
    first = await _start_term(state, SETTINGS, "n.p:3.aa")
    first.put(state.sequencer.number(Quote("EURUSD", 1.1, 1.2, 1.15, 2)))  # then Redis hangs
    assert await _start_term(state, SETTINGS, "n.p:4.bb") is first, "our next term publishes them"
    assert await _start_term(state, SETTINGS, "n.p:6.cc") is not first, "term 5 was another's"


async def test_ticks_left_unpublished_are_dropped_once_fx_last_moved_past_them() -> None:
    bus = MemoryBus()
    state = _State(bus, "n.p")
    first = await _start_term(state, SETTINGS, "n.p:1.aa")
    tick = state.sequencer.number(Quote("EURUSD", 1.1, 1.2, 1.15, 2))
    first.put(tick)
    newer = Tick("EURUSD", 1.1, 1.2, 1.15, 3, tick.epoch, tick.seq + 5)  # another leader numbered on
    await bus.publish([Message("EURUSD", newer.seq, encode_tick(newer))])
    assert await _start_term(state, SETTINGS, "n.p:2.bb") is not first
    assert state.sequencer.number(Quote("EURUSD", 1.1, 1.2, 1.15, 4)).seq == tick.seq + 6
