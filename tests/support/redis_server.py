"""A real redis-server for tests: own free port, restartable; no persistence unless asked (AOF)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .debian import find_or_install
from .ports import free_port

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str:
    """Find redis-server; install Debian's package when root and it is missing."""
    return find_or_install(["redis-server"], ["/usr/bin/redis-server", "/usr/local/bin/redis-server"],
                           ["redis-server"], "the integration tests")


class RedisServer:
    """One redis-server process on 127.0.0.1; stop() and start() keep the same port and dir.

    `persistent=True` runs it as the shipped deployments do (docker-compose.yml,
    deploy/k8s/redis.yaml): AOF on, fsync every second, no RDB snapshots; the data
    dir outlives stop()/start(), so a restart reloads what was fsynced before a kill.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.binary = find_redis_server()
        self.port = free_port()
        self.persistent = persistent
        self.dir = Path(tempfile.mkdtemp(prefix="fxproxy-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None, "already running"
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else \
            ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-500:]}")
            if self._ping():
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def _ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()  # a crash, not a shutdown: what the fault tests want
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
