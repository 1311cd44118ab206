"""Leader election: one ingestor holds a lease in Redis and talks to the vendor; others wait.

The lease value is `{node}.{nonce}:{epoch}.{rand}`: `{node}.{nonce}` names the process (its
*fence*), `{epoch}` comes from INCR fx:epoch and `{rand}` is fresh per term, so a token is new
even when Redis lost fx:epoch and counts from 1 again.

A claim is idempotent for its process: a lease whose holder starts with `{node}.{nonce}:` is
ours whatever the term, so it is extended and returned. A claim that ran in Redis but whose
reply was lost (a hang, a timeout) is therefore adopted by the next claim instead of leaving
nobody leading for a TTL. The lease's commands use a client of their own with a short socket
timeout and no automatic retries, so a claim is never re-sent underneath us.

Fencing is by process too: the publish script refuses a batch only while another process holds
the lease, so retaking our own lease under a new term never fences our own publisher.

Takeover bound: when the leader dies, its lease runs out within `ttl` of its last renewal, and a
standby polls every `ttl / 3`, so a standby leads within ttl + ttl/3, then logs in upstream
(one vendor round trip). After a Redis hang of any length, the first claim Redis executes wins
and its process adopts it on its next poll: someone leads within about ttl/3 of Redis answering.
"""

from __future__ import annotations

import secrets
from typing import Protocol, cast

from shared.names import Names
from shared.redis_url import AnyRedis, connect

# Extend the lease if this process holds it (under any term); if nobody holds it (never taken,
# expired, or Redis restarted empty), take it under a new term. Returns the token now held, or
# false while another process leads. ARGV: process prefix `{node}.{nonce}:`, fresh random, ttl ms.
_CLAIM = """
local mine = ARGV[1]
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, #mine) == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return holder
end
if holder then return false end
local token = mine .. redis.call('INCR', KEYS[2]) .. '.' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return token
"""

# Give the lease up if this process holds it.
_RELEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, #ARGV[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leadership(Protocol):
    fence: str
    """This process's id, which its publisher fences with ("" = no fencing)."""

    async def claim(self) -> str | None:
        """Take or extend the lease: the token held now, or None while another process leads."""
        ...

    async def release(self) -> None:
        """Give the lease up if this process holds it."""
        ...

    async def close(self) -> None: ...


class SoleLeader:
    """Single-process mode: there is nobody to elect against, and nothing to fence."""

    fence = ""

    async def claim(self) -> str | None:
        return ""

    async def release(self) -> None:
        return None

    async def close(self) -> None:
        return None


def lease_client(url: str, ttl: float) -> AnyRedis:
    """A client for lease commands only: a hung Redis shows within min(1 s, ttl/3), and nothing
    is retried underneath us (redis-py >= 6 retries by default), so a claim is sent at most once.
    On a cluster the lease's keys share the `{meta}` slot, so the scripts run there unchanged."""
    timeout = min(1.0, ttl / 3)
    return connect(url, retries=0, socket_timeout=timeout, connect_timeout=timeout,
                   health_check_interval=0)


class RedisLeadership:
    def __init__(self, client: AnyRedis, names: Names, node_id: str, ttl: float,
                 *, owns_client: bool = False) -> None:
        self._client = client
        self._owns_client = owns_client
        self._keys = [names.leader, names.epoch]
        # ':' ends the process id inside a token, so a node id must not contain one.
        self.fence = f"{node_id.replace(':', '_')}.{secrets.token_hex(4)}"
        self._mine = self.fence + ":"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, names: Names, node_id: str, ttl: float) -> RedisLeadership:
        return cls(lease_client(url, ttl), names, node_id, ttl, owns_client=True)

    async def claim(self) -> str | None:
        held = await self._claim(keys=self._keys, args=[self._mine, secrets.token_hex(4), self._ttl_ms])
        return cast(bytes, held).decode() if held else None

    async def release(self) -> None:
        await self._release(keys=self._keys[:1], args=[self._mine])

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
