"""Redis Sentinel for tests: a primary, replicas and three `redis-sentinel` processes, all on free
loopback ports. The sentinels come from Debian's `redis-sentinel` package, installed when missing.

`down_after_ms` is how long the sentinels wait before calling a silent primary down; with 1000 a
kill -9 is failed over within about 2-3 s. close() ends exactly its processes and removes its dirs.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .debian import find_or_install
from .ports import free_port
from .redis_cluster import command, end_all, wait_ping
from .redis_server import find_redis_server

__all__ = ["RedisSentinel", "find_redis_sentinel"]

MASTER = "fxmaster"


def find_redis_sentinel() -> str:
    return find_or_install(["redis-sentinel"], ["/usr/bin/redis-sentinel", "/usr/local/bin/redis-sentinel"],
                           ["redis-sentinel"], "the Sentinel tests")


class RedisSentinel:
    def __init__(self, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.server = find_redis_server()
        self.sentinel = find_redis_sentinel()
        self.data_ports = [0] * (1 + replicas)  # chosen as each process starts
        self.sentinel_ports = [0] * sentinels
        self.down_after_ms = down_after_ms
        self.dir = Path(tempfile.mkdtemp(prefix="fxproxy-sentinel-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{MASTER}"

    def start(self) -> None:
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise

    def _start_all(self) -> None:
        self.data_ports[0] = self._start(self._server_argv)
        primary = self.data_ports[0]
        for i in range(1, len(self.data_ports)):
            self.data_ports[i] = self._start(lambda port: [
                *self._server_argv(port), "--replicaof", "127.0.0.1", str(primary)])
        for i in range(len(self.sentinel_ports)):
            self.sentinel_ports[i] = self._start(lambda port: [self.sentinel, str(self._conf(port))])
        self.wait_replicas_known(20)

    def _server_argv(self, port: int) -> list[str]:
        # Its own dir: a replica's full sync writes an RDB file even with saving off.
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        return [self.server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(node_dir)]

    def _conf(self, port: int) -> Path:
        conf = self.dir / f"sentinel-{port}.conf"  # a sentinel rewrites its own config file
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.data_ports[0]} {len(self.sentinel_ports) // 2 + 1}\n"
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        return conf

    def _start(self, argv: Callable[[int], list[str]], attempts: int = 5) -> int:
        """Start a process on a free port and wait for its PING; the port it got. A port taken
        meanwhile (free_port only says it was free a moment ago) means another try on a new one."""
        for attempt in range(attempts):
            port = free_port()
            self.procs[port] = subprocess.Popen([*argv(port), "--logfile", str(self.dir / f"{port}.log")],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ping(self.procs[port], port, self.dir / f"{port}.log")
                return port
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                del self.procs[port]
        raise AssertionError("unreachable")

    def wait_replicas_known(self, timeout: float) -> None:
        """Until every sentinel knows every replica and its fellow sentinels (failover needs both)."""
        want_replicas, want_peers = len(self.data_ports) - 1, len(self.sentinel_ports) - 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = True
            for port in self.sentinel_ports:
                info = command(port, "SENTINEL", "MASTER", MASTER)
                fields = info.split("\r\n")
                values = dict(zip(fields[2::4], fields[4::4], strict=False))
                if int(values.get("num-slaves", 0)) < want_replicas or \
                        int(values.get("num-other-sentinels", 0)) < want_peers:
                    ok = False
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError(f"sentinels did not learn the replicas and each other in {timeout} s")

    def primary(self) -> int:
        """The primary's port as the first live sentinel reports it."""
        for port in self.sentinel_ports:
            if self.procs[port].poll() is None:
                reply = command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return int(reply.split("\r\n")[4])
        raise LookupError("no sentinel alive")

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def freeze(self, port: int) -> None:
        """SIGSTOP of one process: hung, its sockets left open."""
        self.procs[port].send_signal(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def failover(self) -> None:
        """SENTINEL FAILOVER: a replica is promoted without the primary failing."""
        reply = command(self.sentinel_ports[0], "SENTINEL", "FAILOVER", MASTER)
        if not reply.startswith("+OK"):
            raise RuntimeError(f"SENTINEL FAILOVER refused: {reply.strip()}")

    def wait_new_primary(self, old: int, timeout: float) -> float:
        """Seconds until the sentinels name a primary other than `old` and it says role:master."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                now = self.primary()
                if now != old and "role:master" in command(now, "INFO", "replication"):
                    return time.monotonic() - t0
            except (OSError, LookupError, IndexError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no new primary within {timeout} s")

    def close(self) -> None:
        end_all(self.procs, self.dir)
