"""What one worker of a multi-core edge shares with the others: readiness files and metrics.

The supervisor (edge/workers.py) makes a state directory per run. Any worker may take a
scrape of the shared port (SO_REUSEPORT picks one at random), so each answers for all:
`/metrics` aggregates every worker's files (prometheus-client multiprocess mode) and
`/readyz` is ready only while every worker has its ready file and a fresh beat: each
worker's event loop touches a beat file every second, so one that hangs is seen, by the
others' /readyz at once and by the supervisor, which kills it (edge/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BEAT_INTERVAL = 1.0  # seconds between a worker's beats
STALE_BEAT = 3.0  # a worker whose last beat is older is not ready (its loop is stuck)


def metrics_dir(state_dir: Path) -> Path:
    return state_dir / "metrics"


def ready_file(state_dir: Path, index: int) -> Path:
    return state_dir / "ready" / str(index)


def beat_file(state_dir: Path, index: int) -> Path:
    return state_dir / "ready" / f"beat-{index}"


def beat_age(state_dir: Path, index: int) -> float:
    """Seconds since worker `index` last beat (infinite if it never did)."""
    try:
        return time.time() - beat_file(state_dir, index).stat().st_mtime
    except OSError:
        return float("inf")


def hold(state_dir: Path) -> int:
    """A shared lock on the run directory, held for a process's life: the fd.

    The supervisor and every worker hold one; whoever leaves last (see `leave`) removes
    the directory, so it goes even when the supervisor was killed with -9.
    """
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def leave(state_dir: Path, fd: int) -> None:
    """Let go of the run directory; remove it if no other process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # the supervisor or another worker still runs: it cleans up
        shutil.rmtree(state_dir, ignore_errors=True)
    finally:
        os.close(fd)


def prepare_state_dir(state_dir: Path) -> None:
    """Make the directories and switch prometheus-client to multiprocess mode for the
    workers forked from here on (it reads the environment when a metric is created)."""
    metrics_dir(state_dir).mkdir(parents=True, exist_ok=True)
    (state_dir / "ready").mkdir(exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(metrics_dir(state_dir))
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported already: pick the value class again, before any edge metric
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(slots=True)
class WorkerGroup:
    """One worker's view of its group: index `index` of `count`, state under `state_dir`."""

    index: int
    count: int
    state_dir: Path
    predecessor: str = ""  # edge id of the worker this one replaces, known dead
    listening: bool = False  # set once the port is bound: a failure before that is fatal
    _ready: bool = False

    @property
    def worker_id(self) -> str:
        return f"w{self.index}"

    def set_ready(self, ready: bool) -> None:
        """Publish this worker's readiness to the others (a file holding its pid)."""
        if ready == self._ready:
            return
        self._ready = ready
        path = ready_file(self.state_dir, self.index)
        if ready:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, path)  # readers see the whole pid or no file
        else:
            path.unlink(missing_ok=True)

    def all_ready(self) -> bool:
        """Every worker has said it is ready, is still running, and its loop still turns."""
        for i in range(self.count):
            try:
                pid = int(ready_file(self.state_dir, i).read_text())
            except (OSError, ValueError):
                return False
            if not _alive(pid):  # killed before the supervisor reaped it
                return False
            if i != self.index and beat_age(self.state_dir, i) > STALE_BEAT:
                return False
        return True

    async def beat(self) -> None:
        """Touch this worker's beat file from its event loop, every BEAT_INTERVAL, for ever."""
        path = beat_file(self.state_dir, self.index)
        while True:
            path.touch()
            await asyncio.sleep(BEAT_INTERVAL)

    def render_metrics(self) -> tuple[bytes, str]:
        """Every worker's metrics, summed as each one's multiprocess mode says."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(metrics_dir(self.state_dir)))  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_worker(state_dir: Path, index: int, pid: int) -> None:
    """The supervisor's bookkeeping once worker `index` (process `pid`) has exited."""
    from prometheus_client.multiprocess import mark_process_dead

    path = ready_file(state_dir, index)
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text()) == pid:  # not a successor's file
            path.unlink()
    mark_process_dead(pid, str(metrics_dir(state_dir)))  # type: ignore[no-untyped-call]
