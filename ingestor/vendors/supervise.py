"""The part every vendor session shares: URL failover, backoff, silence detection and metrics."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from urllib.parse import urlsplit, urlunsplit

from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.vendors.base import Hooks
from shared.tick import Quote

log = logging.getLogger("fxproxy.ingestor.upstream")


class UpstreamSilent(Exception):
    pass


class Relogin(Exception):
    """Raised by a dialect's `_connect` when its set changed in a way only a new login can apply
    (neither built-in dialect needs it: both change symbols on the open link): the session logs
    in again at once, on the same URL, without backoff."""


def loggable(url: str) -> str:
    """The URL without credentials or query, which vendors sometimes put keys in."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Supervised(ABC):
    """Stays connected until cancelled, moving to the next URL after each failure.

    A dialect implements `_connect(url)`: log in, call `_logged_in()`, then read until the link
    ends (return, or raise one of `errors`, or Relogin), calling `_heard()` for each message and
    `_deliver()` for each quote; and `_changed(old)` to apply a new set.
    """

    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError, UpstreamSilent)

    def __init__(
        self,
        urls: Sequence[str],
        symbols: Collection[str],
        hooks: Hooks,
        *,
        silence_timeout: float = 10.0,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        connected: asyncio.Event | None = None,
        label: str = "0",
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is required")
        self._urls = list(urls)
        self._order = tuple(dict.fromkeys(symbols))  # priority order (see VendorSession)
        self._symbols = frozenset(self._order)
        self._hooks = hooks
        self._silence = silence_timeout
        self._backoff = backoff or Backoff()
        self._open_timeout = open_timeout
        self.connected = connected or asyncio.Event()
        self.label = label  # which of the pool's sessions, in logs
        self._delivered = False  # the current login has delivered a quote
        self._last_rx = 0.0

    @property
    def symbols(self) -> frozenset[str]:
        return self._symbols

    @property
    def up(self) -> bool:
        return self.connected.is_set()

    def change(self, symbols: Sequence[str]) -> None:
        old, self._order = self._symbols, tuple(dict.fromkeys(symbols))
        self._symbols = frozenset(self._order)
        if old != self._symbols:
            self._changed(old)

    @abstractmethod
    def _changed(self, old: frozenset[str]) -> None:
        """Apply a new `self._symbols` to the live session (or leave it to the next login)."""

    @abstractmethod
    async def _connect(self, url: str) -> None: ...

    async def run(self) -> None:
        attempt = 0
        while True:
            url = self._urls[attempt % len(self._urls)]
            shown = loggable(url)
            self._delivered = False
            try:
                await self._connect(url)
                log.warning("upstream closed the connection", extra={"url": shown, "session": self.label})
            except Relogin:
                log.info("upstream re-login for a new symbol set",
                         extra={"url": shown, "session": self.label, "symbols": len(self._symbols)})
                continue  # same URL, no backoff: nothing failed
            except self.errors as exc:
                log.warning("upstream lost", extra={"url": shown, "session": self.label,
                                                    "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self._set_up(False)
            attempt += 1
            metrics.RECONNECTS.inc()
            if self._delivered:
                # A login that delivered quotes was a good one: the next failure starts over.
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.info("reconnecting upstream", extra={"in_s": round(delay, 2), "session": self.label})
            await asyncio.sleep(delay)

    def _logged_in(self, url: str) -> None:
        self._last_rx = asyncio.get_running_loop().time()
        self._set_up(True)
        log.info("upstream logged in", extra={"url": loggable(url), "session": self.label,
                                              "symbols": len(self._symbols)})

    def _set_up(self, up: bool) -> None:
        if up == self.connected.is_set():
            return
        if up:
            self.connected.set()
        else:
            self.connected.clear()
        self._hooks.on_link()

    def _heard(self) -> None:
        self._last_rx = asyncio.get_running_loop().time()

    def _deliver(self, quote: Quote) -> None:
        metrics.QUOTES_RECEIVED.inc()
        self._delivered = True
        self._hooks.on_quote(quote)

    def _notice(self, raw: str | bytes) -> None:
        metrics.NOTICES.inc()
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        log.warning("vendor notice", extra={"text": text[:200], "session": self.label})

    def _malformed(self, error: Exception, raw: str | bytes) -> None:
        metrics.MALFORMED.inc()
        log.warning("malformed upstream message skipped",
                    extra={"error": str(error), "sample": str(raw)[:120], "session": self.label})

    async def _watch_silence(self, abort: Callable[[], None]) -> None:
        """Raise UpstreamSilent (after calling `abort`, which must end the reader at once) when
        nothing arrived for the silence timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._silence / 4))
            if loop.time() - self._last_rx > self._silence:
                log.warning("upstream silent", extra={"seconds": self._silence, "session": self.label})
                abort()
                raise UpstreamSilent(f"no data for {self._silence:g}s")
