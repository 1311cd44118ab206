"""The `fxproxy` command: edge, ingestor, simfeed, demo, tail, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from fxproxy.config import ConfigError, add_settings_flags, load_settings, unknown_settings
from shared.cluster_bus import ClusterBus
from shared.logs import setup_logging
from shared.names import Names
from shared.redis_bus import RedisBus
from shared.redis_url import parse_redis_url
from shared.settings import (
    CommonSettings,
    EdgeSettings,
    IngestorSettings,
    SimfeedSettings,
    split_csv,
)
from shared.tasks import TaskEnded

if TYPE_CHECKING:
    from edge.workgroup import WorkerGroup
    from fxproxy.simfeed import SimFeed
    from fxproxy.simkabu import SimKabu


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run on uvloop when it is installed; Ctrl-C ends quietly."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        pass
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro) or 0
    except KeyboardInterrupt:
        return 130


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _bus_for(settings: CommonSettings, history_len: int = 1000,
             fence_ttl: float = 30.0) -> RedisBus | ClusterBus:
    """The bus FXPROXY_REDIS_URL names: one Redis or Sentinel, or a Redis Cluster."""
    target = parse_redis_url(settings.redis_url)
    if target.mode == "cluster":
        return ClusterBus(target, Names(settings.prefix, cluster=True), history_len, fence_ttl)
    return RedisBus.from_url(settings.redis_url, Names(settings.prefix), history_len)


async def _edge(settings: EdgeSettings, group: WorkerGroup | None = None) -> int:
    from edge.app import run_edge
    from shared.demand import RedisDemandStore
    from shared.keystore import RedisKeyStore

    bus = _bus_for(settings)
    try:
        await run_edge(settings, bus, RedisKeyStore(bus.client, bus.names), _stop_on_signals(),
                       RedisDemandStore(bus.client, bus.names), group)
    except TaskEnded:  # logged: the supervisor (or Kubernetes) restarts a process that failed
        return 1
    finally:
        await bus.close()
    return 0


def _edge_main(settings: EdgeSettings) -> int:
    """One process, or a supervisor of `--workers N` forked ones sharing the port."""
    if settings.workers == 1:
        return _run(_edge(settings))
    from edge.workers import Supervisor, check_port_free

    check_port_free(settings.host, settings.port)
    return Supervisor(settings, lambda worker, group: _run(_edge(worker, group))).run()


async def _ingestor(settings: IngestorSettings) -> int:
    from ingestor.app import run_ingestor
    from ingestor.leader import RedisLeadership
    from shared.demand import RedisDemandStore

    # A per-symbol fence outlives a few leases, so a deposed leader's late batch meets it.
    bus = _bus_for(settings, settings.history_len, fence_ttl=4 * settings.leader_ttl)
    leadership = RedisLeadership.from_url(bus.url, bus.names, settings.resolved_node_id(),
                                          settings.leader_ttl)
    try:
        await run_ingestor(settings, bus, _stop_on_signals(), leadership,
                           RedisDemandStore(bus.client, bus.names))
    except TaskEnded:  # logged: the supervisor (or Kubernetes) restarts a process that failed
        return 1
    finally:
        await bus.close()
    return 0


async def _simfeed(settings: SimfeedSettings) -> int:
    feed: SimFeed | SimKabu
    if settings.dialect == "kabu":
        from fxproxy.simkabu import SimKabu

        feed = SimKabu(settings.key.get_secret_value(), settings.rate,
                       max_symbols=settings.max_symbols, token_ttl=settings.token_ttl)
    else:
        from fxproxy.simfeed import SimFeed

        feed = SimFeed(settings.key.get_secret_value(), settings.rate, settings.max_connections,
                       max_symbols=settings.max_symbols, quiet=settings.quiet)
    await feed.start(settings.host, settings.port)
    await _stop_on_signals().wait()
    await feed.close()
    return 0


async def _keys(args: argparse.Namespace, settings: CommonSettings) -> int:
    from fxproxy.keys import create_key, parse_symbols, print_keys, revoke_key, update_key
    from shared.keystore import (
        InvalidKeyField,
        KeyExists,
        RedisKeyStore,
        validate_max_connections,
        validate_max_rate,
        validate_name,
    )

    # Refuse what may not be stored before touching Redis: one line, exit 2.
    symbols: tuple[str, ...] | None = None
    try:
        if args.keys_command == "create":
            validate_name(args.name)
        if args.keys_command in ("create", "update"):
            symbols = None if args.symbols is None else parse_symbols(args.symbols)
            if args.max_connections is not None:
                validate_max_connections(args.max_connections)
            if args.max_rate is not None:
                validate_max_rate(args.max_rate)
    except InvalidKeyField as exc:
        print(f"fxproxy keys {args.keys_command}: {exc}", file=sys.stderr)
        return 2

    bus = _bus_for(settings)
    store = RedisKeyStore(bus.client, bus.names)
    try:
        if args.keys_command == "create":
            assert symbols is not None  # --symbols defaults to '*'
            try:
                key = await create_key(store, args.name, symbols, args.max_connections, args.max_rate)
            except KeyExists:
                print(f"fxproxy keys: a key named {args.name!r} exists already", file=sys.stderr)
                return 1
            print(key)
            print(f"(key {args.name!r} created; it is shown only this once)", file=sys.stderr)
        elif args.keys_command == "list":
            print_keys(await store.list(), sys.stdout)
        elif args.keys_command == "revoke":
            if not await revoke_key(store, bus, args.name):
                print(f"fxproxy keys: no key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.name!r}; its connections are being closed (4003)")
        elif args.keys_command == "update":
            if not await update_key(store, bus, args.name, symbols, args.max_connections, args.max_rate):
                print(f"fxproxy keys: no key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"updated {args.name!r}; edges apply it to live connections")
    finally:
        await bus.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxproxy", description="Horizontally scaled WebSocket proxy "
                                "for real-time market data.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edge = sub.add_parser("edge", help="run a client-facing edge (needs Redis)")
    add_settings_flags(edge, EdgeSettings)

    ingestor = sub.add_parser("ingestor", help="run the ingestor: upstream feed -> Redis")
    add_settings_flags(ingestor, IngestorSettings)

    simfeed = sub.add_parser("simfeed", help="run a simulated vendor feed: TraderMade-style, or "
                             "kabuステーション with --dialect kabu")
    bus_only = frozenset(CommonSettings.model_fields) - {"log_level", "log_format"}
    add_settings_flags(simfeed, SimfeedSettings, skip=bus_only)

    demo = sub.add_parser("demo", help="everything in one process, no Redis: watch ticks flow")
    demo.add_argument("--port", type=int, default=8080, help="edge port (default 8080)")
    demo.add_argument("--key", default="demo-key", help="API key clients use (default demo-key)")
    demo.add_argument("--rate", type=float, default=2.0, help="ticks/s per symbol (default 2)")
    demo.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0 = never)")

    tail = sub.add_parser(
        "tail", help="follow ticks from edges, reconnecting and resuming",
        description="Follow symbols with the resuming client (fxproxy.client): on a disconnect it "
        "tries the next URL with backoff and resumes every symbol where it stopped. On a terminal: "
        "a live table; otherwise one line per tick, other events on stderr.")
    tail.add_argument("url", nargs="+", help="ws://HOST:PORT/v1/stream or ws://HOST:PORT/feedadv; "
                      "several are tried in turn")
    tail.add_argument("--key", required=True, help="API key")
    tail.add_argument("--symbols", required=True, help="comma-separated, e.g. EURUSD,GBPUSD")
    tail.add_argument("--count", type=int, default=0, help="stop after N ticks (0 = never)")
    tail.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0 = never)")
    tail.add_argument("--json", action="store_true", help="one JSON object a line: ticks exactly as "
                      'received, other events (state, subscribed, reset, error, anomaly) as {"event": ...}')
    tail.add_argument("--raw", action="store_true", help="same as --json")
    tail.add_argument("--no-table", dest="table", action="store_false",
                      help="tick lines even on a terminal")

    keys = sub.add_parser("keys", help="manage API keys in Redis")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key; prints it once")
    create.add_argument("--name", required=True, help="unique name, used in logs and to revoke: "
                        "1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    create.add_argument("--symbols", default="*", help="allowed symbol globs (A-Z 0-9 * ? @), "
                        "e.g. 'EUR*,GBPUSD'; '*' (the default) for all")
    create.add_argument("--max-connections", type=int, default=0,
                        help="concurrent connections across the cluster (0 = no limit)")
    create.add_argument("--max-rate", type=float, default=0.0,
                        help="ticks a second per symbol its clients get at most, each the latest "
                        "(0 = unthrottled)")
    keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key; its connections close with 4003")
    revoke.add_argument("name")
    update = keys_sub.add_parser("update", help="change a key's symbols or connection limit, live")
    update.add_argument("name")
    update.add_argument("--symbols", default=None, help="new allowed symbol globs ('*' for all)")
    update.add_argument("--max-connections", type=int, default=None,
                        help="new limit (0 = none); connections over it are closed (4008)")
    update.add_argument("--max-rate", type=float, default=None,
                        help="new cap in ticks a second per symbol (0 = unthrottled); live")
    for action in (create, keys_sub.choices["list"], revoke, update):
        action.add_argument("--redis-url", dest="redis_url", default=argparse.SUPPRESS,
                            help="Redis URL [FXPROXY_REDIS_URL]")
        action.add_argument("--prefix", default=argparse.SUPPRESS, help="key prefix [FXPROXY_PREFIX]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tail":
            from fxproxy.client import ClientError
            from fxproxy.tail import tail

            symbols = split_csv(args.symbols)
            try:
                return _run(_tail_main(tail(args.url, args.key, symbols, count=args.count,
                                            duration=args.duration, raw=args.json or args.raw,
                                            table=args.table and sys.stdout.isatty())))
            except ClientError as exc:
                print(f"fxproxy tail: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
        if args.command == "demo":
            setup_logging("warning", "console")
            return _run(_demo_main(args))
        models: dict[str, type[CommonSettings]] = {
            "edge": EdgeSettings, "ingestor": IngestorSettings, "simfeed": SimfeedSettings,
            "keys": CommonSettings,
        }
        model = models[args.command]
        settings = load_settings(model, args)
        setup_logging(settings.log_level, settings.log_format)
        for problem in unknown_settings(os.environ, models.values()):
            logging.getLogger("fxproxy").warning("setting ignored", extra={"problem": problem})
        if isinstance(settings, EdgeSettings):
            return _edge_main(settings)
        if isinstance(settings, IngestorSettings):
            return _run(_ingestor(settings))
        if isinstance(settings, SimfeedSettings):
            return _run(_simfeed(settings))
        return _run(_keys(args, settings))
    except ConfigError as exc:
        print(f"fxproxy {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # settings that parse but cannot work together
        print(f"fxproxy {args.command}: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:
        print(f"fxproxy {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _demo_main(args: argparse.Namespace) -> int:
    from fxproxy.demo import run_demo

    return await run_demo(args.port, args.key, args.duration, args.rate, _stop_on_signals())


async def _tail_main(coro: Coroutine[Any, Any, int]) -> int:
    with contextlib.suppress(asyncio.CancelledError):
        await coro
    return 0
