"""A background task that ends by itself (a crash nobody expected) stops its process with a
non-zero exit, after one error line naming it, instead of leaving it up and quietly wrong."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from fakeredis.aioredis import FakeRedis

from edge.app import run_edge
from fxproxy import cli
from ingestor.app import run_ingestor
from shared.bus import ControlHandler, StateHandler, TickHandler
from shared.memory_bus import MemoryBus, MemorySubscriber
from shared.settings import EdgeSettings, IngestorSettings
from shared.tasks import TaskEnded


class _CrashingSubscriber(MemorySubscriber):
    async def run(self) -> None:
        self._on_state(True)
        await asyncio.sleep(0.2)
        raise KeyError("a bug in the reader")


class _CrashingBus(MemoryBus):
    def subscriber(self, on_tick: TickHandler, on_control: ControlHandler, on_state: StateHandler,
                   *more: Any) -> MemorySubscriber:
        return _CrashingSubscriber(self, on_tick, on_control, on_state)


async def test_an_edge_whose_bus_subscriber_crashes_stops_with_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = EdgeSettings(host="127.0.0.1", port=0, api_keys=["k"], drain_timeout=0)
    started = time.monotonic()
    with pytest.raises(TaskEnded, match="bus subscriber ended"):
        await asyncio.wait_for(run_edge(settings, _CrashingBus(), None, asyncio.Event()), 10)
    took = time.monotonic() - started
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    print(f"edge stopped {took:.2f}s after start (subscriber crashed at 0.2 s)")
    assert took < 2.0
    assert [(r.getMessage(), getattr(r, "task", None)) for r in errors] == [
        ("background task ended: stopping", "bus subscriber")]
    assert "KeyError" in getattr(errors[0], "error", "")


class _ProbeCrashes(MemoryBus):
    async def ping(self) -> None:
        raise KeyError("a bug in the probe")


async def test_an_ingestor_whose_bus_probe_crashes_stops_with_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = IngestorSettings(upstream_urls=["ws://127.0.0.1:1/"], symbols=["EURUSD"],
                                metrics_port=0)
    started = time.monotonic()
    with pytest.raises(TaskEnded, match="bus probe ended"):
        await asyncio.wait_for(run_ingestor(settings, _ProbeCrashes(), asyncio.Event()), 10)
    took = time.monotonic() - started
    assert took < 2.0, took
    assert any(getattr(r, "task", None) == "bus probe" for r in caplog.records if r.levelno == logging.ERROR)


async def test_the_cli_exits_1_when_a_task_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Bus(MemoryBus):
        client = FakeRedis()  # the key and demand stores are built on it, never used

    async def ended(*args: Any) -> None:
        raise TaskEnded("bus subscriber ended (KeyError)")

    monkeypatch.setattr(cli, "_bus_for", lambda *a, **k: _Bus())
    monkeypatch.setattr("edge.app.run_edge", ended)
    assert await cli._edge(EdgeSettings(host="127.0.0.1", port=0)) == 1
