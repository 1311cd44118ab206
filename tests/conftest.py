"""Session-wide fixtures: a real redis-server on a free port, and CLI processes that always end."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import pytest
import redis

from tests.support.ports import free_port
from tests.support.procs import Proc, wait_http, wait_port
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_sentinel import RedisSentinel
from tests.support.redis_server import RedisServer

UPSTREAM_KEY = "test-upstream-key"
API_KEY = "test-api-key"
SYMBOLS = "EURUSD,GBPUSD,USDJPY,AUDUSD,USDCAD"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real Redis Cluster (3 primaries, 3 replicas) for the session; tests that kill nodes
    build their own."""
    built = RedisCluster()
    built.start()
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """The session's Redis Cluster, emptied, as a redis+cluster:// URL."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A primary, two replicas and three sentinels of this test's own (failover tests change
    which node is primary, so nothing is shared)."""
    built = RedisSentinel()
    built.start()
    try:
        yield built
    finally:
        built.close()


StartRedis = Callable[..., RedisServer]


@pytest.fixture
def own_redis() -> Iterator[StartRedis]:
    """Start redis-servers of this test's own, e.g. `own_redis(persistent=True)` (AOF, as
    shipped); each is killed and its data dir removed at teardown."""
    started: list[RedisServer] = []

    def start(persistent: bool = False) -> RedisServer:
        server = RedisServer(persistent=persistent)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A running, empty Redis for this test (a fault test may have stopped it)."""
    if redis_server.proc is None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


StartProc = Callable[..., Proc]


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[StartProc]:
    """Start `fxproxy` processes; each is ended at teardown, and its log shown if the test failed."""
    started: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(*args, env=env)
        started.append(proc)
        return proc

    yield start
    failed = getattr(request.node, "rep_call", None)
    for proc in started:
        if failed is not None and failed.failed:
            print(f"\n----- log of fxproxy {' '.join(proc.args)} -----\n{proc.log[-4000:]}")
        proc.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


class Cluster:
    """Helpers to start the real processes the way a user would, through the CLI."""

    def __init__(self, start: StartProc, redis_url: str) -> None:
        self.start = start
        self.redis_url = redis_url
        self.feed_port = 0

    def simfeed(self, port: int = 0, rate: float = 20.0, quiet: Collection[str] = ()) -> Proc:
        """The vendor stand-in; like a real vendor it takes one logged-in connection at a time.
        `quiet` symbols are carried and never quoted."""
        self.feed_port = port or free_port()
        quiet_args = ("--quiet", ",".join(quiet)) if quiet else ()
        proc = self.start("simfeed", "--port", str(self.feed_port), "--key", UPSTREAM_KEY,
                          "--rate", str(rate), "--max-connections", "1", *quiet_args)
        wait_port(self.feed_port)
        return proc

    def ingestor(self, symbols: str = SYMBOLS, **env: str) -> Proc:
        return self.start("ingestor", env={
            "FXPROXY_REDIS_URL": self.redis_url,
            "FXPROXY_UPSTREAM_URLS": f"ws://127.0.0.1:{self.feed_port}/",
            "FXPROXY_UPSTREAM_KEY": UPSTREAM_KEY,
            "FXPROXY_SYMBOLS": symbols,
            "FXPROXY_METRICS_PORT": str(free_port()),
            "FXPROXY_BACKOFF_INITIAL": "0.2",
            "FXPROXY_BACKOFF_MAX": "1",
            **env,
        })

    def edge(self, **env: str) -> tuple[Proc, int]:
        port = free_port()
        proc = self.start("edge", "--port", str(port), "--host", "127.0.0.1", env={
            "FXPROXY_REDIS_URL": self.redis_url, "FXPROXY_API_KEYS": API_KEY, **env,
        })
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=15)
        return proc, port


@pytest.fixture
def cluster(procs: StartProc, redis_url: str) -> Cluster:
    return Cluster(procs, redis_url)
