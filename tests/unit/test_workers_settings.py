"""`--workers` / FXPROXY_WORKERS parsing, and a worker group's readiness files, without Redis."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge import workers as workers_module
from edge.workers import Supervisor
from edge.workgroup import STALE_BEAT, WorkerGroup, beat_file, forget_worker, ready_file
from fxproxy.cli import main
from fxproxy.config import ConfigError, load_settings
from shared.settings import CommonSettings, EdgeSettings, IngestorSettings


def edge_settings(**flags: str) -> EdgeSettings:
    return load_settings(EdgeSettings, argparse.Namespace(**flags))


@pytest.mark.parametrize(("value", "workers"), [("1", 1), ("2", 2), (" 8 ", 8), ("16", 16)])
def test_workers_takes_a_positive_count(value: str, workers: int) -> None:
    assert edge_settings(workers=value).workers == workers


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    assert edge_settings(workers="auto").workers == len(os.sched_getaffinity(0))
    assert edge_settings(workers="AUTO").workers == len(os.sched_getaffinity(0))


def test_workers_defaults_to_one_process() -> None:
    assert EdgeSettings().workers == 1


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "two", "", "auto2", "1e3"])
def test_bad_workers_fail_in_one_line_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        edge_settings(workers=value)
    message = str(info.value)
    assert "\n" not in message
    assert "workers (FXPROXY_WORKERS)" in message and "'auto'" in message


def test_port_0_is_refused_with_several_workers() -> None:
    with pytest.raises(ConfigError, match=r"port 0 .* needs workers 1"):
        edge_settings(workers="2", port="0")
    assert edge_settings(workers="1", port="0").port == 0


def test_the_edge_command_exits_2_with_one_line_for_bad_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edge", "--workers", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxproxy edge: bad configuration: workers")


def test_the_env_var_is_read_too() -> None:
    env = {**os.environ, "FXPROXY_WORKERS": "nope"}
    out = subprocess.run([sys.executable, "-m", "fxproxy", "edge"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "FXPROXY_WORKERS" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_group_is_ready_only_while_every_worker_has_said_so(tmp_path: Path) -> None:
    (tmp_path / "ready").mkdir()
    w0, w1 = WorkerGroup(0, 2, tmp_path), WorkerGroup(1, 2, tmp_path)
    assert not w0.all_ready()
    w0.set_ready(True)
    assert not w0.all_ready() and not w1.all_ready()
    w1.set_ready(True)
    assert not w0.all_ready(), "w1 never beat: its loop may never have turned"
    for i in (0, 1):
        beat_file(tmp_path, i).touch()
    assert w0.all_ready() and w1.all_ready()
    w1.set_ready(False)  # draining
    assert not w0.all_ready()
    w1.set_ready(True)
    stale = time.time() - STALE_BEAT - 1
    os.utime(beat_file(tmp_path, 1), (stale, stale))  # w1's loop is stuck
    assert not w0.all_ready() and w1.all_ready() is True  # a worker answering is not stuck itself
    beat_file(tmp_path, 1).touch()
    ready_file(tmp_path, 1).write_text("999999999")  # a pid that is gone, not yet reaped
    assert not w0.all_ready()


def test_the_supervisor_forgets_only_the_worker_that_exited(tmp_path: Path) -> None:
    (tmp_path / "ready").mkdir()
    (tmp_path / "metrics").mkdir()
    WorkerGroup(0, 1, tmp_path).set_ready(True)
    forget_worker(tmp_path, 0, os.getpid() + 1)  # a predecessor's exit, after the successor wrote
    assert ready_file(tmp_path, 0).exists()
    forget_worker(tmp_path, 0, os.getpid())
    assert not ready_file(tmp_path, 0).exists()


def test_a_fork_that_fails_is_retried_later_instead_of_ending_the_supervisor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # EAGAIN/ENOMEM right after an OOM kill must not take the other workers down with it.
    supervisor = Supervisor(EdgeSettings(port=18080, workers=2, edge_id="e"), lambda s, g: 0)
    supervisor.state_dir = tmp_path

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    worker = supervisor.workers[0]
    before = time.monotonic()
    supervisor._start(worker)
    assert worker.pid == 0 and worker.starts == 0
    assert worker.due >= before + workers_module.BACKOFF_FIRST  # started again after the backoff


@pytest.mark.parametrize("prefix", ["fx{a}:", "{fx}:", "fx}:", "fx{"])
def test_a_prefix_with_a_brace_fails_in_one_line(prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A brace would be Redis Cluster's hash tag: every symbol in one slot, channels unreadable."""
    for model in (EdgeSettings, IngestorSettings, CommonSettings):
        with pytest.raises(ConfigError, match=r"prefix \(FXPROXY_PREFIX\): .*hash tag") as info:
            load_settings(model, argparse.Namespace(prefix=prefix))
        assert "\n" not in str(info.value)
    # Refused before anything connects (port 1 would refuse at once: exit 1, not 2).
    assert main(["keys", "list", "--prefix", prefix, "--redis-url", "redis+cluster://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefix (FXPROXY_PREFIX)" in err[0], err
    assert edge_settings(prefix="fx-prod:").prefix == "fx-prod:"
