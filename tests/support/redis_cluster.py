"""A real Redis Cluster for tests: 3 primaries + 3 replicas of redis-server on free loopback ports.

`redis-cli --cluster create` assigns the slots and pairs each replica with a primary; start()
returns once every node reports cluster_state:ok and agrees on the primaries. kill(port) is a
kill -9; close() ends exactly the processes it started and removes their directories.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .debian import find_or_install
from .ports import free_port
from .redis_server import find_redis_server

__all__ = ["RedisCluster", "find_redis_cli"]


def find_redis_cli() -> str:
    return find_or_install(["redis-cli"], ["/usr/bin/redis-cli", "/usr/local/bin/redis-cli"],
                           ["redis-tools", "redis-server"], "the Redis Cluster and Sentinel tests")


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command over RESP on 127.0.0.1:port; the raw reply as text (enough for INFO-like replies)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(parts))
        chunks: list[bytes] = []
        s.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if chunks:
                    break
                continue
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


def wait_ping(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 10) -> None:
    """Until the process on `port` answers PING; RuntimeError (with its log's tail) if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process on {port} exited: {log.read_text()[-500:]}")
        try:
            if command(port, "PING", timeout=0.5).startswith("+PONG"):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"nothing answered PING on {port} within {timeout} s")


def end_all(procs: dict[int, subprocess.Popen[bytes]], directory: Path) -> None:
    """kill -9 every process still running (a frozen one is let go on first), then remove their
    directory."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
    procs.clear()
    shutil.rmtree(directory, ignore_errors=True)


class RedisCluster:
    """`node_timeout_ms` is cluster-node-timeout: how long a dead primary takes to be failed over."""

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.binary = find_redis_server()
        self.cli = find_redis_cli()
        self.ports = [free_port() for _ in range(primaries * (1 + replicas))]
        # The bus port is chosen explicitly: the default (port + 10000) may be taken or > 65535.
        self.bus_ports = {port: free_port() for port in self.ports}
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="fxproxy-rcluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.frozen: set[int] = set()  # SIGSTOPped: running, but asking them would hang

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:self.primaries])

    def start(self) -> None:
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        for i in range(len(self.ports)):
            self._start_node(i)
        done = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed: "
                               f"{done.stdout[-1500:]}{done.stderr[-500:]}")
        self.wait_ok(30)

    def _start_node(self, index: int, attempts: int = 5) -> None:
        """Start node `index` and wait for its PING; on a port taken meanwhile (free_port only
        says it was free a moment ago), try again on new ports."""
        for attempt in range(attempts):
            port = self.ports[index]
            self._spawn(port)
            try:
                wait_ping(self.procs[port], port, self.dir / str(port) / "redis.log")
                return
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                del self.procs[port], self.bus_ports[port]
                self.ports[index] = free_port()
                self.bus_ports[self.ports[index]] = free_port()

    def _spawn(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--cluster-enabled", "yes", "--cluster-port", str(self.bus_ports[port]),
             "--cluster-config-file", str(node_dir / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(node_dir),
             # As deploys should: a failed primary's slots stop, not every shard's.
             "--cluster-require-full-coverage", "no",
             "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def alive(self) -> list[int]:
        """Nodes running and not frozen: the ones that answer."""
        return [p for p, proc in self.procs.items() if proc.poll() is None and p not in self.frozen]

    def wait_ok(self, timeout: float) -> float:
        """Seconds until every live node says cluster_state:ok and all agree on the primaries."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                states = [command(p, "CLUSTER", "INFO") for p in self.alive()]
                views = {frozenset(self.primary_ports(p)) for p in self.alive()}
            except OSError:
                states, views = [], set()
            if states and all("cluster_state:ok" in s for s in states) and len(views) == 1 \
                    and len(next(iter(views))) == self.primaries:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ok after {timeout} s")

    def primary_ports(self, via: int | None = None) -> list[int]:
        """Ports of the primaries that hold slots, as node `via` sees them."""
        reply = command(via or self.alive()[0], "CLUSTER", "NODES")
        ports = []
        for line in reply.splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def owner(self, key: str) -> int:
        """The port of the primary serving `key`'s slot now."""
        via = self.alive()[0]
        slot = int(command(via, "CLUSTER", "KEYSLOT", key).strip().lstrip(":"))
        for line in command(via, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                for span in fields[8:]:
                    lo, _, hi = span.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no primary serves slot {slot}")

    def replica_of(self, primary: int) -> int:
        """The port of a live replica of the primary on port `primary`."""
        nodes = [line.split() for line in command(primary, "CLUSTER", "NODES").splitlines()]
        ids = {int(f[1].split("@")[0].rsplit(":", 1)[1]): f[0] for f in nodes if len(f) > 3}
        for f in nodes:
            if len(f) > 3 and "slave" in f[2] and "fail" not in f[2] and f[3] == ids[primary]:
                return int(f[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no live replica of :{primary}")

    def keyslot(self, key: str) -> int:
        return int(command(self.alive()[0], "CLUSTER", "KEYSLOT", key).strip().lstrip(":"))

    def kill(self, port: int) -> None:
        """kill -9 of one node: a crash, as the failover tests want."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def freeze(self, port: int) -> None:
        """SIGSTOP of one node: a hung process that keeps its sockets open."""
        self.procs[port].send_signal(signal.SIGSTOP)
        self.frozen.add(port)

    def thaw(self, port: int) -> None:
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        self.frozen.discard(port)

    def flush(self) -> None:
        for port in self.primary_ports():
            command(port, "FLUSHALL")

    def close(self) -> None:
        end_all(self.procs, self.dir)
