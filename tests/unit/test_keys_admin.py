"""Key administration: what may be stored, how `keys list` prints what was stored before,
and trimming a key's connections to a lowered limit across edges (KeyStore.trim_slots)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from fxproxy.cli import main
from fxproxy.keys import create_key, parse_symbols, print_keys
from shared.keystore import (
    InvalidKeyField,
    KeyRecord,
    KeyStore,
    MemoryKeyStore,
    RedisKeyStore,
    validate_max_connections,
    validate_name,
)
from shared.names import Names

NO_REDIS = "redis://127.0.0.1:1/0"  # nothing listens: any Redis call would fail with exit 1

BAD_NAMES = ["", " alice", "-alice", ".alice", "al ice", "alice\n", "alice\nbob", "al\x1b[31mice",
             "ali\x00ce", "alicé", "a/b", "x" * 65, "x" * 5000]


@pytest.mark.parametrize("name", ["a", "alice", "Alice.Prod_2-eu", "9lives", "x" * 64])
def test_names_matching_the_documented_pattern_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_other_names_are_refused_with_one_printable_line(name: str) -> None:
    with pytest.raises(InvalidKeyField) as info:
        validate_name(name)
    message = str(info.value)
    assert message.startswith("bad key name") and message.isprintable() and len(message) < 200


@pytest.mark.parametrize(("value", "globs"), [
    ("*", ("*",)), ("EUR*, GBPUSD", ("EUR*", "GBPUSD")), ("XAU???,@ES*", ("XAU???", "@ES*")),
    ("A" * 32, ("A" * 32,)),
])
def test_symbol_globs_are_parsed(value: str, globs: tuple[str, ...]) -> None:
    assert parse_symbols(value) == globs


@pytest.mark.parametrize("value", ["", ",", " , ,", "eur*", "EUR/USD", "[A-Z]*", "EUR USD", "A" * 33,
                                   "EUR\x1b[2J"])
def test_empty_or_bad_symbol_globs_are_refused(value: str) -> None:
    with pytest.raises(InvalidKeyField) as info:
        parse_symbols(value)
    assert str(info.value).isprintable()


def test_negative_connection_limit_is_refused() -> None:
    assert validate_max_connections(0) == 0
    with pytest.raises(InvalidKeyField):
        validate_max_connections(-1)


async def test_create_key_refuses_an_empty_symbol_list_instead_of_allowing_everything() -> None:
    store = MemoryKeyStore()
    with pytest.raises(InvalidKeyField):
        await create_key(store, "alice", [], 0)
    assert store.records == {}


@pytest.mark.parametrize("argv", [
    ["create", "--name", "alice", "--symbols", ""],
    ["create", "--name", "alice", "--symbols", " , ,"],
    ["create", "--name", "alice", "--symbols", "eur*"],
    ["create", "--name", "alice", "--max-connections", "-1"],
    ["update", "alice", "--symbols", ""],
    ["update", "alice", "--max-connections", "-3"],
    *(["create", f"--name={name}"] for name in BAD_NAMES),
])
def test_cli_refuses_bad_input_with_exit_2_and_one_line_before_touching_redis(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", *argv, "--redis-url", NO_REDIS]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1 and lines[0].startswith(f"fxproxy keys {argv[0]}: ")
    assert lines[0].isprintable() and len(lines[0]) < 250


def test_cli_with_good_input_does_reach_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the test above: valid input fails only because Redis is not there."""
    assert main(["keys", "create", "--name", "alice", "--symbols", "*", "--redis-url", NO_REDIS]) == 1
    assert "ConnectionError" in capsys.readouterr().err


LEGACY = [
    KeyRecord(""),
    KeyRecord("evil\x1b[2J\x1b[31mroot\nactive", symbols=("EUR\x1b[5m*",)),
    KeyRecord("x" * 5000),
]


def assert_safe_table(text: str, rows: int) -> None:
    lines = text.splitlines()
    assert len(lines) == 1 + rows, lines
    assert all(line.isprintable() and len(line) < 300 for line in lines), lines


def test_keys_list_escapes_legacy_names_and_globs() -> None:
    out = io.StringIO()
    print_keys(LEGACY, out)
    assert_safe_table(out.getvalue(), len(LEGACY))
    assert "evil\\x1b[2J\\x1b[31mroot\\nactive" in out.getvalue()  # bash: $'...' takes it back
    assert "(+4936 chars)" in out.getvalue()


@pytest.mark.integration
def test_keys_list_cli_prints_legacy_records_from_redis_safely(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    names = Names()
    client = redis.Redis.from_url(redis_url)
    for i, record in enumerate(LEGACY):
        client.hset(names.key_names, record.name, f"h{i}")
        client.hset(names.key_record(f"h{i}"), mapping=record.to_hash())  # type: ignore[arg-type]
    client.close()
    assert main(["keys", "list", "--redis-url", redis_url]) == 0
    assert_safe_table(capsys.readouterr().out, len(LEGACY))


# ---- trim_slots: applying a lowered --max-connections to connections already open ----


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[KeyStore]:
    if request.param == "memory":
        yield MemoryKeyStore()
        return
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield RedisKeyStore(client)
    finally:
        await client.aclose()


async def open_slots(store: KeyStore, key: str, per_edge: dict[str, int]) -> None:
    for edge, n in per_edge.items():
        await store.heartbeat(edge, 30)
        for _ in range(n):
            assert await store.acquire_slot(key, edge, 0)


async def live_total(store: KeyStore, key: str, edges: list[str], limit: int = 1000) -> int:
    """Live connections of the key, measured the way an edge would: slots it can still take."""
    taken = 0
    while await store.acquire_slot(key, edges[0], limit):
        taken += 1
    for _ in range(taken):
        await store.release_slot(key, edges[0])
    return limit - taken


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
async def test_two_edges_trimming_in_turn_close_exactly_the_excess(store: KeyStore, order: list[str]) -> None:
    await open_slots(store, "k", {"a": 3, "b": 2})  # 5 open, the limit drops to 2
    cuts = {edge: await store.trim_slots("k", edge, 2) for edge in order}
    assert sum(cuts.values()) == 3
    assert cuts == ({"a": 3, "b": 0} if order[0] == "a" else {"b": 2, "a": 1})
    assert await live_total(store, "k", ["a", "b"]) == 2
    assert not await store.acquire_slot("k", "a", 2)  # at the new limit: the next one is refused
    assert await store.trim_slots("k", "a", 2) == 0  # trimming again closes nothing


async def test_many_edges_trimming_at_once_close_exactly_the_excess(store: KeyStore) -> None:
    edges = [f"edge-{i}" for i in range(6)]
    await open_slots(store, "k", dict.fromkeys(edges, 4))  # 24 open, the limit drops to 7
    cuts = await asyncio.gather(*(store.trim_slots("k", edge, 7) for edge in edges))
    assert sum(cuts) == 17 and all(0 <= c <= 4 for c in cuts)
    assert await live_total(store, "k", edges) == 7


async def test_trim_does_nothing_under_the_limit_or_without_one(store: KeyStore) -> None:
    await open_slots(store, "k", {"a": 2, "b": 1})
    assert await store.trim_slots("k", "a", 0) == 0  # 0 = no limit
    assert await store.trim_slots("k", "a", 3) == 0  # at the limit, not over it
    assert await store.trim_slots("k", "c", 1) == 0  # an edge holding none closes none
    assert await store.trim_slots("other", "a", 1) == 0
    assert await live_total(store, "k", ["a"]) == 3


@pytest.mark.integration
async def test_trim_counts_only_edges_whose_heartbeat_is_alive(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    store = RedisKeyStore(client)
    try:
        await open_slots(store, "k", {"a": 2, "dead": 5})
        await store.heartbeat("dead", -1)  # its heartbeat expired: its 5 stop counting
        assert await store.trim_slots("k", "a", 2) == 0
        assert await store.trim_slots("k", "a", 1) == 1
        assert await client.hgetall(store.names.connections("k")) == {b"a": b"1"}
    finally:
        await client.aclose()
