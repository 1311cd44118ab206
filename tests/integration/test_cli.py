"""The CLI contract other scripts depend on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import API_KEY, Cluster
from tests.support.ports import free_port
from tests.support.tail import assert_resumed_once_without_a_gap, tail_through_a_kill

pytestmark = pytest.mark.integration


def fxproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "fxproxy", *args], capture_output=True, text=True,
                          timeout=30, env=full_env)


def test_demo_shows_live_ticks_within_seconds_without_redis() -> None:
    port = free_port()
    out = fxproxy("demo", "--port", str(port), "--duration", "3", "--rate", "5", env={
        "FXPROXY_REDIS_URL": "redis://127.0.0.1:1/0"})  # proves no Redis is used
    assert out.returncode == 0, out.stderr
    assert f"ws://127.0.0.1:{port}/v1/stream" in out.stdout and "demo-key" in out.stdout
    ticks = [line for line in out.stdout.splitlines() if " bid " in line and " seq " in line]
    assert len(ticks) >= 10
    assert {line.split()[0] for line in ticks} == {"EURUSD", "GBPUSD", "USDJPY"}


def test_tail_prints_ticks_from_an_edge_in_both_dialects(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    _, port = cluster.edge()
    time.sleep(1)
    for path in ("/v1/stream", "/feedadv"):
        out = fxproxy("tail", f"ws://127.0.0.1:{port}{path}", "--key", API_KEY,
                      "--symbols", "EURUSD,GBPUSD", "--count", "5")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 5 and all(line.split()[0] in ("EURUSD", "GBPUSD") for line in lines)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["edge", "--port", "99999"], {}, "port (FXPROXY_PORT): Input should be less than or equal to 65535"),
    (["edge"], {"FXPROXY_MAX_FRAME_SIZE": "lots"}, "max_frame_size (FXPROXY_MAX_FRAME_SIZE)"),
    (["ingestor"], {}, "FXPROXY_UPSTREAM_URLS is empty"),
    (["ingestor"], {"FXPROXY_UPSTREAM_URLS": "ws://127.0.0.1:1/"}, "FXPROXY_SYMBOLS is empty"),
])
def test_bad_configuration_fails_at_start_with_one_clear_line(args: list[str], env: dict[str, str],
                                                               message: str) -> None:
    out = fxproxy(*args, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_a_misspelt_setting_is_named_at_start_with_the_one_meant() -> None:
    # Settings ignore names they do not read (one ConfigMap serves every role), so without
    # this line a typo would leave the default in force unnoticed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")}
    env |= {"FXPROXY_SYMBLOS": "EURUSD", "FXPROXY_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "fxproxy", "simfeed", "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    assert '"msg":"setting ignored"' in first, first
    assert "FXPROXY_SYMBLOS is not an fxproxy setting (did you mean FXPROXY_SYMBOLS?)" in first, first


def test_help_documents_every_setting_with_its_env_var() -> None:
    out = fxproxy("edge", "--help")
    assert out.returncode == 0
    for flag, env in (("--max-frame-size", "FXPROXY_MAX_FRAME_SIZE"), ("--trusted-proxies",
                      "FXPROXY_TRUSTED_PROXIES"), ("--write-delay", "FXPROXY_WRITE_DELAY")):
        assert flag in out.stdout and env in out.stdout


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")}
    proc = subprocess.Popen([sys.executable, "-m", "fxproxy", "demo", "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # wait for the first live tick
            if " seq " in proc.stdout.readline():
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tail_json_survives_an_edge_kill_without_a_gap(cluster: Cluster) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc1, port1 = cluster.edge()
    _, port2 = cluster.edge()
    urls = [f"ws://127.0.0.1:{port1}/v1/stream", f"ws://127.0.0.1:{port2}/v1/stream"]
    assert_resumed_once_without_a_gap(tail_through_a_kill(urls, proc1.kill))
