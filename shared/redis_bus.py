"""The bus on Redis: pub/sub for ticks and control, a hash for last values, streams for history."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import cast

from redis.asyncio import Redis

from shared.bus import (
    AwayHandler,
    ControlHandler,
    Fenced,
    Message,
    ResubscribedHandler,
    StateHandler,
    TickHandler,
)
from shared.names import Names
from shared.redis_subscriber import RedisSubscriber
from shared.redis_url import AnyRedis, connect

log = logging.getLogger("fxproxy.bus")


def connect_redis(url: str, *, retries: int = 3, socket_timeout: float | None = 5.0) -> Redis:
    """A client of one Redis (redis://, rediss://) or of a Sentinel-managed primary."""
    # health_check_interval makes a silently dead connection show itself instead of hanging,
    # socket_timeout a hung Redis; the retry covers pooled connections that died with a Redis
    # restart or a failover (publishes retried this way are harmless: edges drop positions they
    # have seen).
    client = connect(url, retries=retries, socket_timeout=socket_timeout)
    if not isinstance(client, Redis):
        raise ValueError("a Redis Cluster URL needs the cluster bus (shared/cluster_bus.py)")
    return client


# One call per batch: for each tick PUBLISH it, append it to its symbol's capped history
# under id = seq, and keep it as the symbol's last value. Running this in Redis costs one
# command to encode and one reply to parse per batch; as a client-side pipeline it was
# three of each per tick, which capped one ingestor at ~22k ticks/s (bench/ingest.py).
# Per-symbol keys are built inside the script (from prefixes that Names gives it), so
# this needs a single Redis, not a Redis Cluster. The fence check makes a deposed
# ingestor's late batch fail instead of interleaving its seqs with the new leader's; an
# absent lease (Redis restarted) fences nobody, so the sitting leader can publish what
# it queued meanwhile.
_PUBLISH = """
local tick, hist, maxlen, fence = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if fence ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder and string.sub(holder, 1, #fence + 1) ~= fence .. ':' then return -1 end
end
local function position(payload)
  local epoch, seq = string.match(payload, '"epoch":"([^"]*)","seq":(%d+)')
  return epoch, tonumber(seq)
end
-- True when fx:last already holds this position or a later one of the same epoch: the tick
-- is a replay (a retried batch, or a late leader's queue while no lease was held).
local function seen(symbol, payload)
  local current = redis.call('HGET', KEYS[1], symbol)
  if not current then return false end
  local e1, s1 = position(current)
  local e2, s2 = position(payload)
  return e1 == e2 and s1 ~= nil and s2 ~= nil and s1 >= s2
end
local latest, failed = {}, 0
for i = 5, #ARGV, 3 do
  local symbol, payload = ARGV[i], ARGV[i + 2]
  redis.call('PUBLISH', tick .. symbol, payload)
  -- seq 1 opens a new epoch: the history of the old one would block its stream ids
  if ARGV[i + 1] == '1' and not seen(symbol, payload) then redis.call('DEL', hist .. symbol) end
  local ok = redis.pcall('XADD', hist .. symbol, 'MAXLEN', '~', maxlen,
                         ARGV[i + 1] .. '-0', 'p', payload)
  if type(ok) == 'table' and ok.err then failed = failed + 1 end
  latest[symbol] = payload
end
for symbol, payload in pairs(latest) do
  if not seen(symbol, payload) then redis.call('HSET', KEYS[1], symbol, payload) end
end
return failed
"""


async def read_history(client: AnyRedis, key: str, after_seq: int, limit: int) -> list[bytes]:
    """Payloads of a history stream with seq > after_seq, oldest first (stream ids are seqs)."""
    if limit <= 0:
        return []
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await client.xrange(key, min=f"{after_seq + 1}-0", max="+", count=limit),
    )
    return [fields[b"p"] for _id, fields in entries]


# Seconds an edge's read (history refill, snapshot, readiness ping) waits for Redis before it is
# retried on a fresh connection: well inside FXPROXY_REPAIR_TIMEOUT (2 s by default). With
# Sentinel a pooled connection to a primary that hung and was replaced would otherwise hold a
# refill past that timeout; the retry's new connection asks the sentinels where the primary is.
READ_TIMEOUT = 1.0


class RedisBus:
    def __init__(self, url: str, names: Names | None = None, history_len: int = 1000) -> None:
        self.url = url
        self.client = connect_redis(url)
        self._reader = connect_redis(url, socket_timeout=READ_TIMEOUT)
        self.names = names or Names()
        self._history_len = history_len
        self._publish = self.client.register_script(_PUBLISH)

    @classmethod
    def from_url(cls, url: str, names: Names | None = None, history_len: int = 1000) -> RedisBus:
        return cls(url, names, history_len)

    async def publish(self, messages: Sequence[Message], fence: str = "") -> None:
        n = self.names
        args: list[str | int | bytes] = [n.tick_channel(""), n.history(""), self._history_len, fence]
        for symbol, seq, payload in messages:
            args += (symbol, seq, payload)
        failed = await self._publish(keys=[n.last, n.leader], args=args)
        if failed == -1:
            raise Fenced(f"the lease is held by another ingestor process, not {fence}")
        if failed:
            # Only a replayed seq (a retried batch) makes XADD fail: harmless, but say so.
            log.warning("history refused ticks it already had", extra={"ticks": failed})

    async def last(self, symbols: Collection[str] | None = None) -> dict[str, bytes]:
        if symbols is None:
            raw = cast(dict[bytes, bytes], await self.client.hgetall(self.names.last))
            return {k.decode(): v for k, v in raw.items()}
        wanted = list(symbols)
        if not wanted:
            return {}
        values = cast(list[bytes | None], await self._reader.hmget(self.names.last, wanted))
        return {s: v for s, v in zip(wanted, values, strict=True) if v is not None}

    async def history(self, symbol: str, after_seq: int, limit: int) -> list[bytes]:
        return await read_history(self._reader, self.names.history(symbol), after_seq, limit)

    async def publish_control(self, event: bytes) -> None:
        await self.client.publish(self.names.control, event)

    def subscriber(
        self, on_tick: TickHandler, on_control: ControlHandler, on_state: StateHandler,
        on_resubscribed: ResubscribedHandler | None = None, on_away: AwayHandler | None = None,
    ) -> RedisSubscriber:
        # A client of its own that never retries: redis-py would otherwise reconnect and
        # resubscribe underneath us, and ticks published meanwhile would vanish unnoticed. Its
        # reads are bounded by the subscriber's own PINGs, not a socket timeout. One Redis is
        # never partly away: on_away is not called.
        client = connect_redis(self.url, retries=0, socket_timeout=None)
        return RedisSubscriber(client, self.names, on_tick, on_control, on_state, on_resubscribed)

    async def ping(self) -> None:
        await self._reader.ping()

    async def close(self) -> None:
        await self._reader.aclose()
        await self.client.aclose()
