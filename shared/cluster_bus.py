"""The bus on Redis Cluster: a symbol's channel, history and last tick share one slot.

Publishing groups a batch by symbol into one script call each (SPUBLISH + XADD + SET last, the
same replay and epoch rules as the single-Redis script), and sends one pipeline per shard, all at
once. When a shard is away the others still take their ticks, and PartlyPublished hands back only
the away shard's for the publisher to retry. Everything else (keys, lease, control) is in the
`{meta}` slot, so the keystore and the lease run unchanged on whichever shard owns it; while that
shard is away, publishing waits for it (the lease cannot be read).

Fencing. The lease lives in the meta slot, which a symbol's script cannot read. So publish first
reads the lease: held by another process, the batch is refused (Fenced) as in single mode. Each
symbol script then checks `fx:{SYM}:fence`, the newest lease token that published the symbol
(PX a few lease TTLs): a batch from another process with an older term is refused there, atomically
with its ticks. What this fences: a deposed leader whose batch was in flight while the lease changed
hands, once the new leader has published that symbol. What it does not: such a batch for a symbol
the new leader has not published yet (it lands; its seqs are real ticks in the same epoch, and the
new leader's replays of the same positions are dropped by `seen`), and terms that went backwards
because the meta shard lost `fx:{meta}:epoch` (the fence key expires after its TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import cast

from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, SlotNotCoveredError

from shared.bus import (
    AwayHandler,
    ControlHandler,
    Fenced,
    Message,
    PartlyPublished,
    ResubscribedHandler,
    StateHandler,
    TickHandler,
)
from shared.cluster_subscriber import ClusterSubscriber
from shared.names import Names
from shared.redis_bus import READ_TIMEOUT, read_history
from shared.redis_url import ClusterUnavailable, RedisTarget, connect, parse_redis_url

log = logging.getLogger("fxproxy.bus")

# EVAL rather than EVALSHA: a replica promoted by a failover has an empty script cache, and the
# ~1.5 KB of script per symbol per batch is small next to the batch's ticks.
# One symbol's ticks: KEYS hist, last, fence; ARGV channel, maxlen, token, term, fence ttl ms,
# then (seq, payload) pairs. Returns -1 when fenced, else how many XADDs were refused.
_PUBLISH_SYMBOL = """
local channel, maxlen, token = ARGV[1], ARGV[2], ARGV[3]
if token ~= '' then
  local holder = redis.call('GET', KEYS[3])
  local mine = string.match(token, '^[^:]*:') or token
  if holder and string.sub(holder, 1, #mine) ~= mine then
    local held = tonumber(string.match(holder, ':(%d+)'))
    if held and held > tonumber(ARGV[4]) then return -1 end
  end
  redis.call('SET', KEYS[3], token, 'PX', ARGV[5])
end
local function position(payload)
  local epoch, seq = string.match(payload, '"epoch":"([^"]*)","seq":(%d+)')
  return epoch, tonumber(seq)
end
local current = redis.call('GET', KEYS[2])
-- True when the last value already holds this position or a later one of the same epoch.
local function seen(payload)
  if not current then return false end
  local e1, s1 = position(current)
  local e2, s2 = position(payload)
  return e1 == e2 and s1 ~= nil and s2 ~= nil and s1 >= s2
end
local failed, latest = 0, nil
for i = 6, #ARGV, 2 do
  local seq, payload = ARGV[i], ARGV[i + 1]
  redis.call('SPUBLISH', channel, payload)
  if seq == '1' and not seen(payload) then redis.call('DEL', KEYS[1]) end
  local ok = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', maxlen, seq .. '-0', 'p', payload)
  if type(ok) == 'table' and ok.err then failed = failed + 1 end
  latest = payload
end
if latest and not seen(latest) then redis.call('SET', KEYS[2], latest) end
return failed
"""


_RELOAD_INTERVAL = 0.5  # seconds between slot map reloads while a shard is away
_PUBLISH_TIMEOUT = 1.0  # socket and connect timeout of the publishing client, seconds


def term_of(token: str) -> int:
    """The term in a lease token `{node}.{nonce}:{term}.{rand}`; 0 when there is none."""
    try:
        return int(token.partition(":")[2].partition(".")[0])
    except ValueError:
        return 0


class ClusterBus:
    def __init__(self, url: str | RedisTarget, names: Names | None = None, history_len: int = 1000,
                 fence_ttl: float = 30.0) -> None:
        self.target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
        self.url = self.target.url
        # Works with the slots that are served: with full coverage required, one shard away
        # would fail every command (history, snapshots, keys) until its failover ends.
        self.client = cast(RedisCluster, connect(self.target, retries=3, socket_timeout=5.0,
                                                 full_coverage=False))
        # The edge's reads (history refills, snapshots, the readiness ping) have a client whose
        # reads time out within READ_TIMEOUT: one sent to a primary that hung (the map predates
        # its failover) then fails in time for redis-py to fetch a fresh map and retry on its
        # replacement, inside FXPROXY_REPAIR_TIMEOUT; with 5 s it outlasted the repair, and a
        # quiet symbol's refill was lost.
        self._reader = cast(RedisCluster, connect(self.target, retries=3, socket_timeout=READ_TIMEOUT,
                                                  connect_timeout=READ_TIMEOUT, full_coverage=False))
        # Publishing has a client of its own that fails at once and works with the slots that are
        # served: the publisher retries what a shard that is away did not take, and redis-py's
        # own retry (or its wait for full coverage) would hold up every shard. Short timeouts: a
        # batch waits for its slowest shard, so a partitioned primary must not hold it for long.
        self._publisher = cast(RedisCluster, connect(
            self.target, retries=0, socket_timeout=_PUBLISH_TIMEOUT,
            connect_timeout=_PUBLISH_TIMEOUT, full_coverage=False))
        self.names = names or Names(cluster=True)
        if not self.names.cluster:
            raise ValueError("a Redis Cluster bus needs cluster names (Names(cluster=True))")
        self._history_len = history_len
        self._fence_ttl_ms = max(1, int(fence_ttl * 1000))
        self._token = ""  # the newest lease token of ours seen while publishing
        self._reloaded_at = float("-inf")
        self._reloading: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None  # the reader's map, before refills

    async def publish(self, messages: Sequence[Message], fence: str = "") -> None:
        token = await self._lease_token(fence) if fence else ""
        by_symbol: dict[str, list[str | int | bytes]] = defaultdict(list)
        for symbol, seq, payload in messages:
            by_symbol[symbol] += (seq, payload)
        groups = await self._by_node(by_symbol)
        # One pipeline per shard, all at once: a shard that is away holds up only its own symbols.
        outcomes = await asyncio.gather(*(self._publish_group(g, by_symbol, token) for g in groups),
                                        return_exceptions=True)
        fenced: list[str] = []
        unpublished: set[str] = set()
        refused, error = 0, None
        for group, outcome in zip(groups, outcomes, strict=True):
            if isinstance(outcome, (RedisError, OSError)):
                unpublished.update(group)
                error = error or outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                for symbol, result in zip(group, outcome, strict=True):
                    if isinstance(result, (RedisError, OSError)):
                        # That symbol alone (its slot moving, a replica's READONLY): its
                        # shard-mates' ticks are in and must not be sent again each batch.
                        unpublished.add(symbol)
                        error = error or result
                    elif isinstance(result, BaseException):
                        raise result
                    elif result == -1:
                        fenced.append(symbol)
                    else:
                        refused += result
        if fenced:
            raise Fenced(f"a newer leader than {fence} published {', '.join(fenced[:5])}")
        if refused:
            log.warning("history refused ticks it already had", extra={"ticks": refused})
        if error is not None:
            self._reload_slots()
            if len(unpublished) == len(by_symbol):
                raise error
            raise PartlyPublished([m for m in messages if m.symbol in unpublished], error)

    def _reload_slots(self) -> None:
        """A fresh slot map, to find a failed primary's replacement; at most once an interval."""
        now = time.monotonic()
        if now - self._reloaded_at < _RELOAD_INTERVAL or (
                self._reloading is not None and not self._reloading.done()):
            return
        self._reloaded_at = now
        # In the background: while slots are unserved a reload asks every node, the away one too
        # (up to its connect timeout), and the live shards' batches must not wait for that.
        self._reloading = asyncio.create_task(self._reload())

    async def _reload(self) -> None:
        try:
            # The slot map alone (CLUSTER SLOTS): closing the client would also drop the live
            # shards' connections and fetch COMMAND (~100 KB) again on the next publish.
            await self._publisher.nodes_manager.initialize()
        except (RedisClusterException, RedisError, OSError) as exc:
            log.info("slot map reload failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def _by_node(self, symbols: Collection[str]) -> list[list[str]]:
        """Symbols grouped by the primary that owns them, as far as the slot map knows."""
        try:
            await self._publisher.initialize()
        except RedisClusterException as exc:
            raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        groups: dict[str, list[str]] = defaultdict(list)
        for symbol in symbols:
            try:
                node = self._publisher.get_node_from_key(self.names.tick_channel(symbol))
            except SlotNotCoveredError:
                node = None  # the pipeline finds out, or fails that group alone
            groups[node.name if node is not None else ""].append(symbol)
        return list(groups.values())

    async def _publish_group(self, symbols: list[str], ticks: dict[str, list[str | int | bytes]],
                             token: str) -> list[int | BaseException]:
        """One shard's pipeline: each symbol's script result, or its error (the whole pipeline
        raises only when the shard itself fails)."""
        n = self.names
        pipe = self._publisher.pipeline(transaction=False)
        for symbol in symbols:
            keys = (n.history(symbol), n.last_value(symbol), n.fence(symbol))
            pipe.eval(_PUBLISH_SYMBOL, len(keys), *keys, n.tick_channel(symbol), self._history_len,
                      token, term_of(token), self._fence_ttl_ms, *ticks[symbol])
        return cast(list[int | BaseException], await pipe.execute(raise_on_error=False))

    async def _lease_token(self, fence: str) -> str:
        holder = cast(bytes | None, await self.client.get(self.names.leader))
        if holder is None:
            # No lease (expired, or the meta shard lost it): fence nobody, as in single mode.
            return self._token or f"{fence}:0.0"
        held = holder.decode()
        if not held.startswith(fence + ":"):
            raise Fenced(f"the lease is held by another ingestor process, not {fence}")
        self._token = held
        return held

    async def last(self, symbols: Collection[str] | None = None) -> dict[str, bytes]:
        if symbols is None:
            symbols = await self._known_symbols()
        wanted = list(symbols)
        if not wanted:
            return {}
        values = cast(list[bytes | None], await self._reader.mget_nonatomic(
            [self.names.last_value(s) for s in wanted]))
        return {s: v for s, v in zip(wanted, values, strict=True) if v is not None}

    async def _known_symbols(self) -> list[str]:
        # A SCAN of every primary rather than an index in the meta slot: no extra write on the
        # publish path and no index to go stale. Only ingestors ask: at term start, and every
        # TTL/3 while a standby without positions of its own waits.
        pattern = _glob_escape(self.names.last_value("")).replace("{}", "{*}")
        start = len(self.names.last_value("")) - len("}:last")
        symbols: list[str] = []
        async for key in self.client.scan_iter(match=pattern, count=1000):
            name = cast(bytes, key).decode()
            symbols.append(name[start:-len("}:last")])
        return symbols

    async def history(self, symbol: str, after_seq: int, limit: int) -> list[bytes]:
        return await read_history(self._reader, self.names.history(symbol), after_seq, limit)

    async def publish_control(self, event: bytes) -> None:
        # Classic PUBLISH: a cluster forwards it to every node, so every edge hears it.
        await self.client.publish(self.names.control, event)

    def subscriber(
        self, on_tick: TickHandler, on_control: ControlHandler, on_state: StateHandler,
        on_resubscribed: ResubscribedHandler | None = None, on_away: AwayHandler | None = None,
    ) -> ClusterSubscriber:
        refill = None if on_resubscribed is None else self._after_fresh_map(on_resubscribed)
        return ClusterSubscriber(self.target, self.names, on_tick, on_control, on_state, refill, on_away)

    def _after_fresh_map(self, handler: ResubscribedHandler) -> ResubscribedHandler:
        """`handler`, called once the reading client has a fresh slot map: symbols are
        resubscribed where they live after a failover, and their refill must read history there,
        not from the primary they left (which redis-py would only find out by a timeout)."""
        waiting: set[str] = set()

        async def refresh() -> None:
            while waiting:
                symbols = set(waiting)
                with contextlib.suppress(RedisClusterException, RedisError, OSError):
                    await self._reader.nodes_manager.initialize()
                waiting.difference_update(symbols)
                handler(symbols)

        def resubscribed(symbols: Collection[str]) -> None:
            waiting.update(symbols)
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(refresh())

        return resubscribed

    async def ping(self) -> None:
        """The node of the `{meta}` slot answers: keys, limits, lease and control live there.
        Not every primary: one shard away holds up only its symbols, and a probe that failed
        for it would make every edge unready for the whole failover."""
        try:
            await self._reader.initialize()  # a no-op unless an error asked for a fresh map
            node = self._reader.get_node_from_key(self.names.leader)
        except RedisClusterException as exc:  # no node answers, or the slot is unserved
            raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if node is None:
            raise ClusterUnavailable("no slot map yet")
        await self._reader.ping(target_nodes=node)

    async def close(self) -> None:
        for task in (self._reloading, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._publisher.aclose()
        await self._reader.aclose()
        await self.client.aclose()


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
