"""`fxproxy tail --json` as a subprocess, through a kill of the edge it reads from."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson

from tests.conftest import API_KEY


def tail_through_a_kill(urls: list[str], kill: Callable[[], None], ticks: int = 80) -> list[dict[str, Any]]:
    """Run tail until it printed 20 ticks, call `kill`, and return all it printed up to `ticks` ticks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")}
    tail = subprocess.Popen([sys.executable, "-m", "fxproxy", "tail", "--json", "--key", API_KEY,
                             "--symbols", "EURUSD,GBPUSD", "--count", str(ticks), "--duration", "20", *urls],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert tail.stdout is not None
        lines: list[str] = []
        while sum('"type":"tick"' in line for line in lines) < 20:
            line = tail.stdout.readline()
            assert line, tail.stderr.read() if tail.stderr else ""
            lines.append(line)
        kill()
        rest, stderr = tail.communicate(timeout=30)
        assert tail.returncode == 0, stderr
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    return [orjson.loads(line) for line in lines + rest.splitlines()]


def assert_resumed_once_without_a_gap(events: list[dict[str, Any]], ticks: int = 80) -> None:
    """One reconnect, an exact resume of both symbols, no reset or anomaly, contiguous seqs."""
    got = [e for e in events if e.get("type") == "tick"]
    others = [e for e in events if "event" in e]
    assert len(got) == ticks and len(got) + len(others) == len(events)
    assert [e["state"] for e in others if e["event"] == "state"].count("reconnecting") == 1
    assert [e["recovered"] for e in others if e["event"] == "subscribed" and e["recovered"]] == [
        {"EURUSD": True, "GBPUSD": True}]
    assert not [e for e in others if e["event"] in ("anomaly", "reset")]
    for symbol in ("EURUSD", "GBPUSD"):
        seqs = [t["seq"] for t in got if t["symbol"] == symbol]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{symbol}: {seqs}"
