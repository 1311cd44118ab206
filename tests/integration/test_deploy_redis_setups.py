"""The Redis setups of the compose overrides work: deploy/redis/ run for real on loopback.

docker-compose.cluster.yml builds its cluster with deploy/redis/cluster-init.sh from nodes
running deploy/redis/cluster-node.conf; docker-compose.sentinel.yml makes three Sentinels from
deploy/redis/sentinel.conf. Here the same files run on redis-servers of the test's own (the
config checks of `make validate` only show that each file starts).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.debian import find_or_install
from tests.support.deploy_check import REPO_ROOT, free_cluster_port, sentinel_config_for
from tests.support.redis_server import find_redis_server

pytestmark = pytest.mark.integration

REDIS_DIR = REPO_ROOT / "deploy" / "redis"


def find_redis_cli() -> str:
    return find_or_install(["redis-cli"], ["/usr/bin/redis-cli"], ["redis-tools"], __name__)


def answers(proc: subprocess.Popen[bytes], port: int) -> bool:
    """True once the redis on port answers PING; False if it exited first; fails after 10 s."""
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        deadline = time.monotonic() + 10
        while proc.poll() is None:
            with contextlib.suppress(redis.RedisError):
                client.ping()
                return True
            assert time.monotonic() < deadline, "redis did not answer PING within 10 s"
            time.sleep(0.05)
        return False
    finally:
        client.close()


@contextlib.contextmanager
def redis_processes() -> Iterator[Callable[..., int]]:
    """start(*args) runs a redis-server (or Sentinel) on a free loopback port in its own folder; all
    that were started are killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, workdir: Path) -> int:
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "redis.log"
        # The free port may be taken before redis binds it (other tests run beside this one): retry.
        for _attempt in range(3):
            port = free_cluster_port()
            log.unlink(missing_ok=True)
            # `-::1`: also on IPv6 loopback where there is one, since `localhost` may resolve to it.
            proc = subprocess.Popen([find_redis_server(), *args, "--port", str(port), "--bind", "127.0.0.1",
                                     "-::1", "--dir", str(workdir), "--logfile", str(log)],
                                    cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(proc)
            if answers(proc, port):
                return port
            assert "Address already in use" in log.read_text(errors="replace"), log.read_text()[-800:]
        raise AssertionError(f"no free port for redis after 3 attempts: {log.read_text()[-800:]}")

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
            proc.wait(timeout=10)


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until condition() holds; fails the test after timeout."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - started


def cluster_info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.split())


def run_init(ports: list[int]) -> subprocess.CompletedProcess[str]:
    cli_dir = str(Path(find_redis_cli()).parent)
    return subprocess.run(["sh", str(REDIS_DIR / "cluster-init.sh"), *(f"127.0.0.1:{p}" for p in ports)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": f"{cli_dir}:/usr/bin:/bin"})


def test_the_cluster_init_makes_three_primaries_once_and_reruns_without_harm(tmp_path: Path) -> None:
    with redis_processes() as start:
        ports = [start(str(REDIS_DIR / "cluster-node.conf"), "--cluster-announce-hostname", "localhost",
                       workdir=tmp_path / f"node{i}") for i in range(3)]
        started = time.monotonic()
        first = run_init(ports)
        created = time.monotonic() - started
        assert first.returncode == 0, first.stdout + first.stderr
        assert "creating the cluster" in first.stdout

        client = redis.Redis(port=ports[0], decode_responses=True)
        info = cluster_info(client)
        assert info["cluster_state"] == "ok" and int(info["cluster_size"]) == 3, info
        # Clients are sent node names, not addresses (cluster-preferred-endpoint-type hostname).
        slots = client.execute_command("CLUSTER", "SHARDS")
        assert len(slots) == 3
        assert {node["endpoint"] for shard in slots for node in shard["nodes"]} == {"localhost"}, slots
        assert sum(end - begin + 1 for shard in slots for begin, end in zip(shard["slots"][::2],
                                                                              shard["slots"][1::2],
                                                                              strict=True)) == 16384
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        ids = {node["id"] for shard in slots for node in shard["nodes"]}

        started = time.monotonic()
        again = run_init(ports)
        rerun = time.monotonic() - started
        assert again.returncode == 0, again.stdout + again.stderr
        assert "cluster exists" in again.stdout
        # The same three nodes: nothing was recreated, and the handshakes of the re-introduction end.
        settled = wait_for("known nodes back to 3",
                           lambda: cluster_info(client)["cluster_known_nodes"] == "3", timeout=20)
        shards = client.execute_command("CLUSTER", "SHARDS")
        assert {node["id"] for shard in shards for node in shard["nodes"]} == ids
        client.close()
    print(f"cluster created and ok in {created:.2f} s; re-run {rerun:.2f} s, "
          f"handshakes settled {settled:.2f} s later")
    assert created < 30 and rerun < 30


def test_the_sentinel_template_finds_its_peers_and_fails_over(tmp_path: Path) -> None:
    """Three Sentinels made from deploy/redis/sentinel.conf the way the compose file makes them."""
    template = (REDIS_DIR / "sentinel.conf").read_text(encoding="utf-8")
    with redis_processes() as start:
        primary = start("--save", "", "--replica-announce-ip", "localhost", workdir=tmp_path / "primary")
        replica = start("--save", "", "--replica-announce-ip", "localhost", "--replicaof", "127.0.0.1",
                        str(primary), workdir=tmp_path / "replica")
        sentinels = []
        for i in range(3):
            folder = tmp_path / f"sentinel{i}"
            folder.mkdir()
            # What the compose command does: copy the template, append this Sentinel's name.
            conf = sentinel_config_for(template, primary, "localhost") + "sentinel announce-ip localhost\n"
            (folder / "sentinel.conf").write_text(conf, encoding="utf-8")
            sentinels.append(start(str(folder / "sentinel.conf"), "--sentinel", workdir=folder))
        clients = [redis.Redis(port=p, decode_responses=True) for p in sentinels]

        def everyone_knows_everyone() -> bool:
            for client in clients:
                master = client.execute_command("SENTINEL", "MASTER", "fxproxy")
                if int(master["num-other-sentinels"]) != 2 or int(master["num-slaves"]) != 1:
                    return False
            return True

        discovered = wait_for("Sentinels and replica discovered", everyone_knows_everyone, timeout=30)
        addr = clients[0].execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fxproxy")
        assert [addr[0], int(addr[1])] == ["localhost", primary], addr
        replica_client = redis.Redis(port=replica, decode_responses=True)
        synced = wait_for("replica in sync", lambda: replica_client.info("replication")["master_link_status"]
                          == "up", timeout=30)

        assert clients[0].execute_command("SENTINEL", "FAILOVER", "fxproxy") in (b"OK", "OK", True)
        failed_over = wait_for("replica promoted", lambda: all(
            int(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fxproxy")[1]) == replica
            for c in clients), timeout=30)
        for client in [*clients, replica_client]:
            client.close()
    print(f"Sentinels discovered each other and the replica in {discovered:.1f} s, replica synced "
          f"{synced:.1f} s later; SENTINEL FAILOVER promoted it in {failed_over:.1f} s")
    assert failed_over < 20
