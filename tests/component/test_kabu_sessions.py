"""The pool and the kabu driver against the in-process simulator: registration changes on one
token, a shared list that fills up or loses our symbols, kabu's errors as the reference has them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from fxproxy.simkabu import SimKabu
from ingestor import pool as pool_module
from ingestor.vendors import kabu as kabu_module
from ingestor.vendors.kabu import (
    REGISTER_FAILED,
    REGISTER_LIMIT,
    REGISTER_PARTLY,
    SYMBOL_NOT_FOUND,
    TOKEN_MISMATCH,
    UNREGISTER_FAILED,
    UNREGISTER_PARTLY,
    WRONG_PASSWORD,
)
from shared.settings import IngestorSettings
from tests.support.upstream import Recorder, eventually, pool_running


@pytest.fixture
async def kabu() -> AsyncIterator[tuple[SimKabu, str]]:
    sim = SimKabu("pw", rate=40, max_symbols=3, seed=5)
    port = await sim.start("127.0.0.1", 0)
    yield sim, f"http://127.0.0.1:{port}/kabusapi"
    await sim.close()


async def test_kabu_changes_are_register_and_unregister_on_one_token(kabu: tuple[SimKabu, str]) -> None:
    sim, base = kabu
    settings = IngestorSettings(upstream_dialect="kabu", upstream_urls=base,  # type: ignore[arg-type]
                                upstream_key="pw", symbols="9433@1,7203@1,1111@1",  # type: ignore[arg-type]
                                backoff_initial=0.05)
    rec = Recorder()
    async with pool_running(settings, rec) as pool:
        await eventually(lambda: rec.seen(0) == {"9433@1", "7203@1"})
        assert ("1111@1", "unknown") in rec.statuses and sorted(sim.registered) == ["7203@1", "9433@1"]
        changed = time.monotonic()
        pool.want(["9433@1", "6758@1"])
        await eventually(lambda: sorted(sim.registered) == ["6758@1", "9433@1"]
                         and "6758@1" in rec.seen(changed))
        # Another app takes the token: the next call is refused (401) and retried on a new one.
        sim.token = "someone-else"
        pool.want(["9433@1", "6758@1", "8306@1"])
        await eventually(lambda: "8306@1" in rec.seen(changed))
        await asyncio.sleep(0.3)
        pause = rec.longest_pause({"9433@1"}, changed, time.monotonic())
    print(f"\n9433@1's longest pause through two registration changes and a token refusal: {pause:.3f}s")
    assert pause < 0.5
    assert sim.tokens_issued == 2


def kabu_settings(base: str, symbols: str, **kw: object) -> IngestorSettings:
    return IngestorSettings(upstream_dialect="kabu", upstream_urls=base, upstream_key="pw",  # type: ignore[arg-type]
                            symbols=symbols, backoff_initial=0.05, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [REGISTER_LIMIT, REGISTER_FAILED, REGISTER_PARTLY])
async def test_kabu_full_list_is_capacity_by_priority_retried_on_a_timer_never_a_relogin_loop(
        kabu: tuple[SimKabu, str], code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "CAPACITY_RETRY", 0.5)
    sim, base = kabu
    sim.full_code = code
    sim.register_elsewhere(["9984@1"])  # another app holds one of the three places
    # Configured in this order: with room for two, the first two get it (not 6758@1, the
    # alphabetically first), and the other app's registration is left alone.
    rec = Recorder()
    async with pool_running(kabu_settings(base, "9433@1,7203@1,6758@1"), rec):
        started = time.monotonic()
        refused = await eventually(lambda: ("6758@1", "capacity") in rec.statuses)
        await eventually(lambda: rec.seen(0) == {"9433@1", "7203@1"})
        await asyncio.sleep(1.0)  # long enough for a relogin loop at 0.05 s backoff to show
        tokens, registered = sim.tokens_issued, list(sim.registered)
        pause = rec.longest_pause({"9433@1", "7203@1"}, started + refused + 0.2, time.monotonic())
        sim.unregister_elsewhere(["9984@1"])  # the other app leaves: room, and nobody tells us
        freed = time.monotonic()
        admitted = await eventually(lambda: "6758@1" in rec.seen(freed))
    print(f"\nlist full ({code}): capacity in {refused:.2f}s, {tokens} token(s), longest pause of the "
          f"registered two {pause:.3f}s; room made -> streaming {admitted:.2f}s later (retry 0.5 s)")
    assert tokens == 1 and sim.cleared_all == 0
    assert registered == ["9984@1", "9433@1", "7203@1"]
    assert rec.statuses.count(("6758@1", "capacity")) == 1 and pause < 0.5
    assert admitted < 0.5 + 2.5 and ("6758@1", "streaming") in rec.statuses


async def test_kabu_capacity_on_one_station_moves_the_symbol_to_another_with_room(
        kabu: tuple[SimKabu, str]) -> None:
    sim, base = kabu
    other = SimKabu("pw", rate=40, max_symbols=3, seed=6)
    other_base = f"http://127.0.0.1:{await other.start('127.0.0.1', 0)}/kabusapi"
    sim.register_elsewhere(["9984@1", "8035@1"])  # room for one on the first station
    settings = kabu_settings(f"{base},{other_base}", "9433@1,7203@1", upstream_max_symbols=3,
                             upstream_max_connections=2)
    rec = Recorder()
    try:
        async with pool_running(settings, rec) as pool:
            moved = await eventually(lambda: rec.seen(0) == {"9433@1", "7203@1"})
            streamed = pool.streamed()
    finally:
        await other.close()
    print(f"\nno room on the first kabuステーション: the second carries the symbol after {moved:.2f}s")
    assert sim.registered == ["9984@1", "8035@1", "9433@1"] and other.registered == ["7203@1"]
    assert ("7203@1", "capacity") not in rec.statuses and streamed == {"9433@1", "7203@1"}


async def test_kabu_registrations_removed_behind_our_back_come_back_at_the_recheck(
        kabu: tuple[SimKabu, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kabu_module, "RECHECK_INTERVAL", 0.3)
    sim, base = kabu
    rec = Recorder()
    async with pool_running(kabu_settings(base, "9433@1,7203@1"), rec) as pool:
        await eventually(lambda: rec.seen(0) == {"9433@1", "7203@1"})
        sim.unregister_elsewhere(["9433@1"])  # another app's unregister names ours too
        removed = time.monotonic()
        back = await eventually(lambda: "9433@1" in rec.seen(removed + 0.05))
        # Our symbol gone from a change's answer: no longer taken as registered.
        sim.unregister_elsewhere(["7203@1"])
        pool.want(["9433@1", "7203@1", "6758@1"])
        await eventually(lambda: "7203@1" in sim.registered and "6758@1" in sim.registered)
    print(f"\nregistration removed behind our back: streaming again {back:.2f}s later (recheck 0.3 s)")
    assert back < 0.3 + 2.5 and sim.tokens_issued == 1


async def test_kabu_unregistering_a_symbol_already_gone_is_done_not_a_relogin(
        kabu: tuple[SimKabu, str]) -> None:
    sim, base = kabu
    rec = Recorder()
    async with pool_running(kabu_settings(base, "9433@1,7203@1"), rec) as pool:
        await eventually(lambda: rec.seen(0) == {"9433@1", "7203@1"})
        sim.unregister_elsewhere(["7203@1"])
        changed = time.monotonic()
        pool.want(["9433@1", "6758@1"])  # unregistering 7203@1 gets 4001020
        await eventually(lambda: "6758@1" in rec.seen(changed))
        sim.unregister_elsewhere(["6758@1"])
        pool.want(["9433@1", "8306@1"])  # and partly (4001021): 6758@1 gone, 9433@1 stays
        await eventually(lambda: "8306@1" in rec.seen(changed))
        await asyncio.sleep(0.3)
        pause = rec.longest_pause({"9433@1"}, changed, time.monotonic())
    print(f"\nunregistering symbols already gone: 9433@1's longest pause {pause:.3f}s")
    assert sim.tokens_issued == 1 and pause < 0.5 and sorted(sim.registered) == ["8306@1", "9433@1"]


async def test_kabu_registering_one_by_one_backs_off_when_throttled() -> None:
    throttled = SimKabu("pw", rate=40, seed=7, max_calls=4)  # 4 calls a second, like a busy station
    throttled_base = f"http://127.0.0.1:{await throttled.start('127.0.0.1', 0)}/kabusapi"
    # A symbol kabu does not know fails the whole request: the rest are asked one at a time.
    symbols = ["9433@1", "7203@1", "6758@1", "9984@1", "8306@1", "9432@1", "6861@1", "1111@1"]
    rec = Recorder()
    try:
        async with pool_running(kabu_settings(throttled_base, ",".join(symbols)), rec):
            took = await eventually(lambda: rec.seen(0) == set(symbols[:-1]), timeout=15)
    finally:
        await throttled.close()
    print(f"\n{len(symbols)} symbols one by one at 4 calls/s: all streaming after {took:.2f}s, "
          f"{throttled.throttled} calls refused as too many and retried")
    assert throttled.throttled >= 1 and throttled.tokens_issued == 1
    assert ("1111@1", "unknown") in rec.statuses and took < 15


async def test_kabu_symbol_missing_from_the_register_answer_is_unknown(kabu: tuple[SimKabu, str]) -> None:
    sim, base = kabu
    sim.unlisted = {"8306@1"}
    settings = IngestorSettings(upstream_dialect="kabu", upstream_urls=base,  # type: ignore[arg-type]
                                upstream_key="pw", symbols="9433@1,8306@1",  # type: ignore[arg-type]
                                backoff_initial=0.05)
    rec = Recorder()
    async with pool_running(settings, rec) as pool:
        told = await eventually(lambda: ("8306@1", "unknown") in rec.statuses and "9433@1" in rec.seen(0))
        await eventually(lambda: pool.streamed() == {"9433@1"})
    print(f"\na symbol the RegistList left out was reported unknown in {told:.2f}s")
    assert ("9433@1", "streaming") in rec.statuses and sim.tokens_issued == 1


async def test_kabu_simulator_answers_like_the_reference(kabu: tuple[SimKabu, str]) -> None:
    _, base = kabu

    async def call(http: aiohttp.ClientSession, method: str, path: str, body: object,
                   token: str = "") -> tuple[int, dict[str, object]]:
        headers = {"X-API-KEY": token} if token else {}
        async with http.request(method, base + path, data=orjson.dumps(body), headers=headers) as resp:
            return resp.status, orjson.loads(await resp.read())

    def symbols(*codes: str) -> dict[str, object]:
        return {"Symbols": [{"Symbol": c, "Exchange": 1} for c in codes]}

    async with aiohttp.ClientSession() as http:
        assert (await call(http, "POST", "/token", {"APIPassword": "nope"}))[1]["Code"] == WRONG_PASSWORD
        status, body = await call(http, "PUT", "/register", symbols("9433"), "made-up")
        assert (status, body["Code"]) == (401, TOKEN_MISMATCH)
        token = str((await call(http, "POST", "/token", {"APIPassword": "pw"}))[1]["Token"])
        assert (await call(http, "PUT", "/register", symbols("9433", "0000"), token))[1]["Code"] == (
            SYMBOL_NOT_FOUND)
        status, body = await call(http, "PUT", "/register", symbols("9433", "7203"), token)
        assert status == 200 and len(body["RegistList"]) == 2  # type: ignore[arg-type]
        assert (await call(http, "PUT", "/register", symbols("6758", "9984"), token))[1]["Code"] == (
            REGISTER_LIMIT)  # three at most here, like kabu's fifty
        newer = str((await call(http, "POST", "/token", {"APIPassword": "pw"}))[1]["Token"])
        assert (await call(http, "PUT", "/unregister", symbols("9433"), token))[0] == 401
        status, body = await call(http, "PUT", "/unregister", symbols("9433"), newer)
        assert body == {"RegistList": [{"Symbol": "7203", "Exchange": 1}]}
        assert (await call(http, "PUT", "/unregister", symbols("9433"), newer))[1]["Code"] == (
            UNREGISTER_FAILED)  # not registered
        status, body = await call(http, "PUT", "/unregister", symbols("9433", "7203"), newer)
        assert (status, body["Code"]) == (400, UNREGISTER_PARTLY)
        assert (await call(http, "PUT", "/register", {"Symbols": []}, newer))[1] == {"RegistList": []}
