"""Is the bus answering? A ping with a short deadline, so a hung Redis shows within seconds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger("fxproxy.bus")


class BusProbe:
    """Pings every `interval`; `ok` turns False after a ping fails or takes over `timeout`."""

    def __init__(self, ping: Callable[[], Awaitable[object]], interval: float = 0.5,
                 timeout: float = 1.5, on_change: Callable[[bool], None] | None = None) -> None:
        self._ping = ping
        self._interval = interval
        self._timeout = timeout
        self._on_change = on_change
        self.ok = True

    async def run(self) -> None:
        while True:
            try:
                # Not wait_for: on 3.11 it swallows a cancel that meets an instant ping's
                # completion, and this loop would outlive the edge's shutdown.
                async with asyncio.timeout(self._timeout):
                    await self._ping()
                self._set(True)
            except (RedisError, OSError, TimeoutError) as exc:
                self._set(False, exc)
            await asyncio.sleep(self._interval)

    def _set(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok == self.ok:
            return
        self.ok = ok
        if ok:
            log.info("bus answers again")
        else:
            log.warning("bus not answering", extra={"error": f"{type(exc).__name__}: {exc}"})
        if self._on_change is not None:
            self._on_change(ok)
