"""Looking into a multi-core edge from outside, through /proc: its worker processes, and
which of them holds the server end of a given client connection."""

from __future__ import annotations

import base64
import os
import socket
import time
from pathlib import Path

__all__ = ["alive", "children", "raw_upgrade", "serving_pid", "wait_children"]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> set[int]:
    """Live processes whose parent is `pid`."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def wait_children(pid: int, n: int, timeout: float = 10.0,
                  other_than: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """The `n` live children of `pid`, once there are that many and none is in `other_than`."""
    deadline = time.monotonic() + timeout
    while True:
        kids = children(pid)
        if len(kids) == n and not kids & other_than:
            return kids
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} has children {kids}, wanted {n} other than {other_than}")
        time.sleep(0.02)


def _inode(server_port: int, client_port: int) -> int | None:
    """The socket inode of the server end of 127.0.0.1:client_port -> 127.0.0.1:server_port."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(fields[9])
    return None


def serving_pid(server_port: int, client_port: int, pids: set[int], timeout: float = 3.0) -> int:
    """Which of `pids` holds the accepted socket of the client connection from `client_port`."""
    deadline = time.monotonic() + timeout
    while True:
        inode = _inode(server_port, client_port)
        if inode:
            target = f"socket:[{inode}]"
            for pid in pids:
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                            return pid
                    except OSError:
                        continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"no process of {pids} holds the connection from port {client_port}")
        time.sleep(0.01)


def raw_upgrade(port: int, key: str, pids: set[int]) -> tuple[int, int]:
    """Open a TCP connection, find the worker that accepted it, then ask to upgrade with `key`:
    (that worker's pid, the HTTP status it answered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        pid = serving_pid(port, sock.getsockname()[1], pids)
        nonce = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {key}\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return pid, int(head.split()[1])
