"""FXPROXY_REDIS_URL in its three modes, and the one place every Redis client is made.

    redis://[user:pass@]host:port[/db]   rediss://...            one Redis (as redis-py reads it)
    redis+cluster://[user:pass@]host:port[,host:port...]          Redis Cluster (rediss+cluster: TLS)
    redis+sentinel://[user:pass@]host:port[,host:port...]/MASTER[/db]   Sentinel-managed primary
    (rediss+sentinel: TLS to the primary; the sentinels themselves are asked in plain TCP)

A URL that cannot work raises ValueError with one line saying why, before anything connects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

Mode = Literal["single", "cluster", "sentinel"]


class ClusterUnavailable(RedisError):
    """redis-py's cluster errors that are not RedisErrors (no reachable node, an uncovered slot),
    so that every `except RedisError` that rides out a Redis outage rides out these too."""


class _RedisCluster(RedisCluster):
    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise ValueError("shard_hint is not supported in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except RedisClusterException as exc:
            raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc


class _SentinelManaged(Redis):
    """A client of the primary that also closes the connections to the sentinels it asked."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if isinstance(manager, Sentinel):
            await manager.aclose()


AnyRedis = Redis | RedisCluster

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"single": 6379, "cluster": 6379, "sentinel": 26379}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a bus URL names; `url` is kept for single mode, which redis-py parses itself."""

    mode: Mode
    url: str = field(repr=False)  # may hold a password
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def node_url(self, host: str, port: int) -> str:
        """A single-node URL for one member of this cluster or sentinel set, with its credentials."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        host = f"[{host}]" if ":" in host else host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{port}/0"


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a bus URL, or ValueError (one line) if it cannot work."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"bad FXPROXY_REDIS_URL {_redacted(url)!r}: use redis://, rediss://, "
                         "redis+cluster://host:port[,host:port...] or "
                         "redis+sentinel://host:port[,host:port...]/MASTER_NAME")
    mode, tls = _SCHEMES[scheme.lower()]
    if mode == "single":
        return RedisTarget("single", url, tls=tls)
    rest = rest.split("?", 1)[0]
    userinfo, at, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    nodes = tuple(_host_port(part, _DEFAULT_PORT[mode], url) for part in hosts.split(","))
    parts = [p for p in path.split("/") if p]
    master, db = "", 0
    if mode == "cluster":
        if parts and parts != ["0"]:
            raise ValueError(f"bad FXPROXY_REDIS_URL {_redacted(url)!r}: a Redis Cluster has only "
                             "database 0, so nothing may follow the nodes but /0")
    else:
        if not parts:
            raise ValueError(f"bad FXPROXY_REDIS_URL {_redacted(url)!r}: name the Sentinel master, "
                             "e.g. redis+sentinel://host:26379/mymaster")
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"bad FXPROXY_REDIS_URL {_redacted(url)!r}: after the sentinels comes "
                             "/MASTER_NAME and optionally /DB (a number)")
        master, db = unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    return RedisTarget(mode, url, nodes, master, db, username, password, tls)


def _host_port(part: str, default: int, url: str) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [::1]:6379
        host, _, tail = part[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
        if tail and not tail.startswith(":"):
            host = ""
    else:
        host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
    if not host:
        raise ValueError(f"bad FXPROXY_REDIS_URL {_redacted(url)!r}: {part!r} is not host:port")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad FXPROXY_REDIS_URL {_redacted(url)!r}: bad port in {part!r}")
    return host, int(port_text)


def _redacted(url: str) -> str:
    """The URL with any password replaced and no query (`?password=` works too), for errors and logs."""
    scheme, sep, rest = url.partition("://")
    rest, query, _ = rest.partition("?")
    userinfo, at, tail = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{tail}"
    return f"{scheme}{sep}{rest}{'?...' if query else ''}"



def connect(url: str | RedisTarget, *, retries: int, socket_timeout: float | None,
            connect_timeout: float = 5.0, health_check_interval: float = 10.0,
            full_coverage: bool = True) -> AnyRedis:
    """A client for the URL's mode with these timeouts; `retries=0` means nothing is ever re-sent
    underneath the caller (the lease and the subscriber depend on that). `full_coverage=False`
    lets a cluster client work with the slots that are served while a failed primary's are not."""
    target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries) if retries else \
        Retry(NoBackoff(), 0)
    retry_on = [RedisConnectionError, RedisTimeoutError] if retries else []
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True, "health_check_interval": health_check_interval,
    }
    if target.mode == "single":
        return Redis.from_url(target.url, retry=retry, retry_on_error=retry_on, **options)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.mode == "cluster":
        return _RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], ssl=target.tls,
                             retry=retry, require_full_coverage=full_coverage, **auth, **options)
    # The sentinels themselves are asked with the same short timeouts; each new connection
    # asks them where the primary is now, which is how a failover is followed.
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs={
        "socket_timeout": connect_timeout, "socket_connect_timeout": connect_timeout})
    client: Redis = sentinel.master_for(target.master, redis_class=_SentinelManaged, db=target.db,
                                        ssl=target.tls, retry=retry, retry_on_error=retry_on,
                                        **auth, **options)
    return client
