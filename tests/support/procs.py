"""Start fxproxy CLI processes for tests and end exactly those, whatever happens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["Proc", "metric", "wait_http", "wait_port"]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_http(url: str, timeout: float = 10.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == status:
                    return
                last = resp.status
        except urllib.error.HTTPError as exc:
            last = exc.code
            if exc.code == status:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


def metric(port: int, name: str, default: float | None = None) -> float:
    """One sample from an edge's /metrics, named with its labels as exposed (`x{code="1013"}`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        body = resp.read().decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"{name} not in /metrics")


class Proc:
    """`python -m fxproxy ARGS` with FXPROXY_* env; output goes to a log file shown on failure."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        fd, name = tempfile.mkstemp(prefix=f"fxproxy-{args[0]}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")}
        full_env.update({"FXPROXY_LOG_FORMAT": "json", "FXPROXY_LOG_LEVEL": "info", **(env or {})})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fxproxy", *args], env=full_env,
                stdout=log, stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        self.kill()
        self.log_path.unlink(missing_ok=True)
