"""Background tasks that must run until cancelled: one that ends is a broken process.

A loop that crashes (a bug, an exception nobody expected) would otherwise leave the process up and
quietly wrong: a dead bus subscriber means a ready edge with no ticks. So the process waits on its
stop signal and its tasks together; the first task to end is logged and ends the process with a
non-zero exit, for the supervisor (or Kubernetes) to restart it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any


class TaskEnded(RuntimeError):
    """A background task that should run until cancelled ended: the process must stop."""


async def until_stopped(stop: asyncio.Event, tasks: Collection[asyncio.Task[Any]],
                        log: logging.Logger) -> None:
    """Return once `stop` is set; if one of `tasks` ends first, log why and raise TaskEnded."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    ended = [t for t in tasks if t in done]
    if ended:
        raise task_ended(ended[0], log)


def task_ended(task: asyncio.Task[Any], log: logging.Logger) -> TaskEnded:
    """Log why a finished background task ended; the TaskEnded to raise for it."""
    error: BaseException | None = asyncio.CancelledError() if task.cancelled() else task.exception()
    why = "returned" if error is None else f"{type(error).__name__}: {error}"
    log.error("background task ended: stopping", extra={"task": task.get_name(), "error": why},
              exc_info=error if isinstance(error, Exception) else None)
    ended = TaskEnded(f"{task.get_name()} ended ({why})")
    ended.__cause__ = error
    return ended


async def cancel_all(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel them and wait until they have ended; a task that failed already was reported by
    until_stopped. A task still running a second later is cancelled again: on 3.11 wait_for
    swallows a cancel that meets its inner call's completion."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
