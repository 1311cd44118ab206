"""Leader election: one ingestor holds a lease in Redis and talks to the vendor; others wait.

The lease value is `{node}.{nonce}:{epoch}`, the epoch from INCR, so every term has a token of its
own; the publish script refuses batches fenced with a token that is not the holder's.
"""

from __future__ import annotations

import secrets
from typing import Protocol, cast

from redis.asyncio import Redis

from shared.names import Names

# Extend our lease; if nobody holds it (never taken, expired, or Redis restarted empty),
# take it under a new epoch. Returns the token now held, or false while another leads.
# Acquiring is this with a token nobody holds.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return holder
end
if holder then return false end
local token = ARGV[2] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return token
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leadership(Protocol):
    async def acquire(self) -> str | None:
        """The new term's token, or None while another node leads."""
        ...

    async def renew(self, token: str) -> str | None:
        """The token still (or again) held, or None once another node leads."""
        ...

    async def release(self, token: str) -> None: ...


class SoleLeader:
    """Single-process mode: there is nobody to elect against, and nothing to fence."""

    async def acquire(self) -> str | None:
        return ""

    async def renew(self, token: str) -> str | None:
        return token

    async def release(self, token: str) -> None:
        return None


class RedisLeadership:
    def __init__(self, client: Redis, names: Names, node_id: str, ttl: float) -> None:
        self._keys = [names.leader, names.epoch]
        # A per-process suffix keeps tokens unique even if two processes share a node id or
        # Redis lost fx:epoch and counts from 1 again.
        self._node = f"{node_id}.{secrets.token_hex(3)}"
        self._ttl_ms = int(ttl * 1000)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    async def acquire(self) -> str | None:
        return await self.renew("")

    async def renew(self, token: str) -> str | None:
        held = await self._claim(keys=self._keys, args=[token, self._node, self._ttl_ms])
        return cast(bytes, held).decode() if held else None

    async def release(self, token: str) -> None:
        await self._release(keys=self._keys[:1], args=[token])
