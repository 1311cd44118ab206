"""The supervisor of a multi-core edge (`fxproxy edge --workers N`): N forked workers bind one
port with SO_REUSEPORT; one that dies is restarted, and SIGTERM drains them all.

The supervisor stays single-threaded and loop-free, so forking it is safe: it only forks,
waits for signals (blocked, taken with sigtimedwait) and reaps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from edge.workgroup import WorkerGroup, beat_age, forget_worker, hold, leave, prepare_state_dir
from shared.settings import EdgeSettings

log = logging.getLogger("fxproxy.edge")

RunWorker = Callable[[EdgeSettings, WorkerGroup], int]

EXIT_START_FAILED = 3  # a worker that never listened (port taken, bad address): restarts won't help
BACKOFF_FIRST = 0.25  # seconds before restarting a worker that died
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that ran this long starts its next backoff from BACKOFF_FIRST
DRAIN_GRACE = 15.0  # beyond FXPROXY_DRAIN_TIMEOUT, for a worker to close its bus and exit
HUNG_AFTER = 10.0  # a worker whose event loop has not beaten for this long is killed and restarted
_STOP = (signal.SIGTERM, signal.SIGINT)
_SIGNALS = (signal.SIGCHLD, *_STOP)
_PR_SET_PDEATHSIG = 1


def check_port_free(host: str, port: int) -> None:
    """Raise OSError if anything listens on host:port, another edge's workers included: with
    SO_REUSEPORT ours would silently join them and take half their connections."""
    for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR as asyncio sets it (a recent edge's TIME_WAIT is no obstacle), but not
            # SO_REUSEPORT: then any listener on the port, reuse-port or not, refuses the bind.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise OSError(exc.errno, f"cannot listen on {host}:{port}: {why}") from None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _tag_logs(worker_id: str) -> None:
    """Every log line of this process names its worker."""

    def tag(record: logging.LogRecord) -> bool:
        record.worker = worker_id
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


@dataclass(slots=True)
class Worker:
    index: int
    pid: int = 0  # 0 while not running
    edge_id: str = ""  # of its latest process
    starts: int = 0
    started: float = 0.0
    due: float = 0.0  # monotonic time of its next start, while not running
    backoff: float = BACKOFF_FIRST


class Supervisor:
    """Runs `run_worker(settings, group)` in each of `settings.workers` forked processes."""

    def __init__(self, settings: EdgeSettings, run_worker: RunWorker) -> None:
        self.settings = settings
        self.run_worker = run_worker
        self.base_id = settings.resolved_edge_id()
        self.workers = [Worker(i) for i in range(settings.workers)]
        self.state_dir = Path()
        self.pid = os.getpid()
        self.restarts = 0
        self._lock = -1  # the supervisor's hold on the run directory
        self._restarts_metric: Callable[[], None] = lambda: None

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; 0 once every worker has drained and exited."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        self.state_dir = Path(tempfile.mkdtemp(prefix="fxproxy-edge-"))
        try:
            self._lock = hold(self.state_dir)
            prepare_state_dir(self.state_dir)
            from prometheus_client import Counter  # after prepare_state_dir: multiprocess values

            counter = Counter("fxproxy_edge_worker_restarts", "Edge worker processes restarted "
                              "after they died (multi-core edges only)", registry=None)
            self._restarts_metric = counter.inc
            log.info("edge supervisor starting", extra={
                "workers": len(self.workers), "edge_id": self.base_id, "port": self.settings.port,
                "state_dir": str(self.state_dir)})
            return self._supervise()
        finally:
            self._kill_all()
            if self._lock >= 0:
                os.close(self._lock)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _supervise(self) -> int:
        for worker in self.workers:
            self._start(worker)
        while True:
            due = [w.due for w in self.workers if not w.pid]
            timeout = max(0.0, min(due) - time.monotonic()) if due else 1.0
            if self._wait(min(timeout, 1.0)) in _STOP:
                return self._drain()
            for worker, code in self._reap():
                if code == EXIT_START_FAILED and worker.starts == 1:
                    log.error("edge worker could not start; stopping", extra={
                        "worker": f"w{worker.index}"})
                    self._drain()
                    return 1
                self._schedule_restart(worker, code)
            if set(signal.sigpending()) & set(_STOP):
                continue  # a stop is pending: take it before starting anything
            now = time.monotonic()
            for worker in self.workers:
                if not worker.pid and worker.due <= now:
                    self._start(worker)
                elif worker.pid and now - worker.started > HUNG_AFTER \
                        and beat_age(self.state_dir, worker.index) > HUNG_AFTER:
                    # Stuck, yet the kernel keeps handing it new connections: end it.
                    log.error("edge worker hung; killing it", extra={
                        "worker": f"w{worker.index}", "pid": worker.pid, "silent_s": HUNG_AFTER})
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)

    def _wait(self, timeout: float) -> int | None:
        info = signal.sigtimedwait(_SIGNALS, timeout)
        return info.si_signo if info is not None else None

    def _reap(self) -> list[tuple[Worker, int]]:
        """Workers that exited since the last call, with their exit codes (-N: signal N)."""
        out: list[tuple[Worker, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for worker in self.workers:
                if worker.pid == pid:
                    worker.pid = 0
                    forget_worker(self.state_dir, worker.index, pid)
                    out.append((worker, os.waitstatus_to_exitcode(status)))
        return out

    def _schedule_restart(self, worker: Worker, code: int, why: str = "edge worker exited") -> None:
        now = time.monotonic()
        if now - worker.started >= STABLE_AFTER:
            worker.backoff = BACKOFF_FIRST
        worker.due = now + worker.backoff
        log.warning(f"{why}; restarting", extra={
            "worker": f"w{worker.index}", "exit_code": code, "restart_in_s": worker.backoff})
        worker.backoff = min(BACKOFF_MAX, 2 * worker.backoff)

    def _start(self, worker: Worker) -> None:
        # A restarted worker gets a new edge id and frees the slots its predecessor held in
        # Redis (fx:conns:*) at once, as it is known dead: never inherited, never leaked.
        edge_id = f"{self.base_id}-w{worker.index}" + (f".{worker.starts}" if worker.starts else "")
        settings = self.settings.model_copy(update={"edge_id": edge_id, "workers": 1})
        group = WorkerGroup(worker.index, len(self.workers), self.state_dir, worker.edge_id)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN/ENOMEM, e.g. right after an OOM kill: try again later
            worker.started = time.monotonic()  # so repeated failures back off further
            self._schedule_restart(worker, -1, f"fork failed: {exc}")
            return
        if pid == 0:
            self._child(settings, group)
        worker.pid, worker.started, worker.edge_id = pid, time.monotonic(), edge_id
        worker.starts += 1
        extra = {"worker": group.worker_id, "pid": pid, "edge_id": edge_id}
        if worker.starts > 1:
            self.restarts += 1
            self._restarts_metric()
            log.info("edge worker restarted", extra={**extra, "restarts": self.restarts})
        else:
            log.info("edge worker started", extra=extra)

    def _child(self, settings: EdgeSettings, group: WorkerGroup) -> NoReturn:
        code, lock = 1, -1
        try:  # from here on nothing may return into the supervisor's code (it would kill siblings)
            os.close(self._lock)  # the supervisor's: its lock must end with the supervisor
            lock = hold(self.state_dir)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            die_with_parent()
            _tag_logs(group.worker_id)
            if os.getppid() != self.pid:  # the supervisor died before prctl took effect
                os._exit(1)
            code = self.run_worker(settings, group)
        except BaseException as exc:  # whatever ends a worker, it must not return into the loop
            if group.listening:
                log.exception("edge worker failed", extra={"worker": group.worker_id})
            else:
                code = EXIT_START_FAILED
                print(f"fxproxy edge: worker {group.worker_id}: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                if lock >= 0:
                    leave(self.state_dir, lock)
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _drain(self) -> int:
        """SIGTERM every worker (each drains its clients with 1001) and wait for all to exit."""
        running = [w for w in self.workers if w.pid]
        log.info("draining edge workers", extra={"workers": len(running)})
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout + DRAIN_GRACE
        while any(w.pid for w in self.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("edge workers did not exit in time; killing them", extra={
                    "pids": [w.pid for w in self.workers if w.pid]})
                return 1
            self._wait(min(left, 0.5))  # a second SIGTERM changes nothing
            self._reap()
        log.info("edge supervisor stopped")
        return 0

    def _kill_all(self) -> None:
        """No orphans, whatever went wrong: SIGKILL what still runs and reap it."""
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.pid = 0
