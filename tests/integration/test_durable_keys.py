"""Key records survive a Redis crash when Redis runs as shipped (AOF, fsync every second).

Each test starts a redis-server of its own, creates a key with the real CLI, kills
Redis with SIGKILL, restarts it on the same port and data dir, and asks an edge and
`keys list` what is left. The contrast test runs the same steps without persistence
and shows the key is gone, so the first test would catch a deployment that lost AOF.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import Cluster, StartProc, StartRedis
from tests.support.client import open_native, send_json, until
from tests.support.procs import wait_http
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

NAME = "durable-alice"
ROOT = Path(__file__).resolve().parents[2]


def keys_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fxproxy", "keys", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=30)


def crash_and_restart(server: RedisServer) -> float:
    """kill -9 Redis more than a second after the last write (so an everysec fsync ran),
    start it again on the same port and dir; seconds the restart took (incl. AOF load)."""
    time.sleep(1.2)
    server.stop()  # SIGKILL
    started = time.monotonic()
    server.start()  # returns once PING answers, i.e. after the AOF is loaded
    return time.monotonic() - started


async def start_edge_and_crash_redis(own_redis: StartRedis, procs: StartProc,
                                     persistent: bool) -> tuple[RedisServer, str, int]:
    """A key made through the CLI and checked at an edge (ticks flowing from a simulated
    feed through an ingestor); then Redis crashes and restarts."""
    server = own_redis(persistent=persistent)
    cluster = Cluster(procs, server.url)
    cluster.simfeed()
    cluster.ingestor(symbols="EURUSD,GBPUSD")
    out = keys_cli(server.url, "create", "--name", NAME, "--symbols", "EUR*",
                   "--max-connections", "5")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    _, port = cluster.edge()
    async with await open_native(port, key) as ws:  # works before the crash
        await send_json(ws, {"op": "ping", "id": 1})
        assert (await until(ws, lambda m: m.get("type") == "pong"))["id"] == 1
    restart = crash_and_restart(server)
    ready_from = time.monotonic()
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=15)  # the edge is back on the bus
    print(f"\n[durable keys, persistent={persistent}] redis restart {restart * 1000:.0f} ms, "
          f"edge ready {(time.monotonic() - ready_from) * 1000:.0f} ms later")
    return server, key, port


async def test_key_made_with_the_cli_still_authenticates_after_redis_is_killed_and_restarted_with_aof(
        own_redis: StartRedis, procs: StartProc) -> None:
    server, key, port = await start_edge_and_crash_redis(own_redis, procs, persistent=True)
    assert any((server.dir / "appendonlydir").glob("*.aof")), "no AOF was written"

    started = time.monotonic()
    async with await open_native(port, key) as ws:  # HTTP 101: the record was found
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD", "GBPUSD"], "id": 1})
        refused = await until(ws, lambda m: m.get("code") == "forbidden_symbol")
        subscribed = await until(ws, lambda m: m.get("type") == "subscribed")
        tick = await until(ws, lambda m: m.get("type") == "tick" and not m.get("snapshot"))
    print(f"[durable keys] first connection after the restart: live tick in "
          f"{(time.monotonic() - started) * 1000:.0f} ms")
    # The whole record came back, not just its existence: globs still apply.
    assert refused["symbols"] == ["GBPUSD"]
    assert subscribed["symbols"] == ["EURUSD"] and tick["symbol"] == "EURUSD"

    listing = keys_cli(server.url, "list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(NAME))
    assert row.split()[1:3] == ["active", "5"] and row.endswith("EUR*"), row


async def test_without_persistence_the_same_crash_loses_the_key(
        own_redis: StartRedis, procs: StartProc) -> None:
    server, key, port = await start_edge_and_crash_redis(own_redis, procs, persistent=False)

    with pytest.raises(InvalidStatus) as info:
        await open_native(port, key)
    assert info.value.response.status_code == 401
    listing = keys_cli(server.url, "list")
    assert listing.returncode == 0, listing.stderr
    assert NAME not in listing.stdout


@pytest.mark.parametrize(("path", "volume"), [
    ("docker-compose.yml", ["- redis-data:/data", "\nvolumes:\n  redis-data:"]),
    ("deploy/k8s/redis.yaml", ["volumeClaimTemplates:", "mountPath: /data"]),
])
def test_shipped_redis_runs_with_the_aof_settings_tested_above_on_a_volume(path: str,
                                                                           volume: list[str]) -> None:
    """What the tests above prove only holds if the deployments keep these settings."""
    text = (ROOT / path).read_text()
    line = next(ln for ln in text.splitlines() if '"redis-server"' in ln and not ln.lstrip().startswith("#"))
    argv = json.loads(line.split(":", 1)[1])  # command: [...] / args: [...]
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert flags.get("--appendonly") == "yes" and flags.get("--appendfsync") == "everysec", argv
    assert all(part in text for part in volume), f"{path}: Redis' /data is not on a volume"
