"""Supervises the vendor connection: login, silence detection, failover and reconnect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from ingestor import metrics
from ingestor.backoff import Backoff
from ingestor.tradermade import GREETING, MalformedMessage, login_frame, parse_message
from shared.tick import Quote

log = logging.getLogger("fxproxy.ingestor.upstream")


class UpstreamSilent(Exception):
    pass


def loggable(url: str) -> str:
    """The URL without credentials or query, which vendors sometimes put keys in."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Upstream:
    def __init__(
        self,
        urls: Sequence[str],
        user_key: str,
        symbols: Sequence[str],
        on_quote: Callable[[Quote], None],
        *,
        headers: Mapping[str, str] | None = None,
        silence_timeout: float = 10.0,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        connected: asyncio.Event | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is required")
        self._urls = list(urls)
        self._user_key = user_key
        self._symbols = list(symbols)
        self._on_quote = on_quote
        self._headers = dict(headers or {})
        self._silence = silence_timeout
        self._backoff = backoff or Backoff()
        self._open_timeout = open_timeout
        self.connected = connected or asyncio.Event()
        self._delivered = False  # the current session has delivered a quote

    async def run(self) -> None:
        """Stay connected until cancelled, moving to the next URL after each failure."""
        attempt = 0
        while True:
            url = self._urls[attempt % len(self._urls)]
            shown = loggable(url)
            self._delivered = False
            try:
                await self._session(url)
                log.warning("upstream closed the connection", extra={"url": shown})
            except (OSError, TimeoutError, WebSocketException, UpstreamSilent) as exc:
                log.warning("upstream lost", extra={"url": shown, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    metrics.UPSTREAM_UP.set(0)
            attempt += 1
            metrics.RECONNECTS.inc()
            if self._delivered:
                # A login that delivered quotes was a good one: the next failure starts over.
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.info("reconnecting upstream", extra={"in_s": round(delay, 2)})
            await asyncio.sleep(delay)

    async def _session(self, url: str) -> None:
        async with connect(
            url,
            additional_headers=self._headers,
            open_timeout=self._open_timeout,
            ping_interval=None,  # silence detection below covers a dead peer
            max_size=2**20,
            compression=None,
        ) as ws:
            await self._login(ws)
            self.connected.set()
            metrics.UPSTREAM_UP.set(1)
            log.info("upstream logged in", extra={"url": loggable(url), "symbols": len(self._symbols)})
            watchdog = asyncio.create_task(self._watch_silence(ws))
            try:
                await self._read(ws)
            finally:
                watchdog.cancel()
            if watchdog.done() and not watchdog.cancelled() and watchdog.exception():
                raise UpstreamSilent(f"no data for {self._silence:g}s")

    async def _login(self, ws: ClientConnection) -> None:
        greeting = await asyncio.wait_for(ws.recv(), self._open_timeout)
        if greeting != GREETING:
            self._notice(greeting)
        await ws.send(login_frame(self._user_key, self._symbols))

    async def _read(self, ws: ClientConnection) -> None:
        self._last_rx = asyncio.get_running_loop().time()
        async for raw in ws:
            self._last_rx = asyncio.get_running_loop().time()
            try:
                quote = parse_message(raw)
            except MalformedMessage as exc:
                metrics.MALFORMED.inc()
                log.warning("malformed upstream message skipped",
                            extra={"error": str(exc), "sample": str(raw)[:120]})
                continue
            if quote is None:
                self._notice(raw)
                continue
            metrics.QUOTES_RECEIVED.inc()
            self._delivered = True
            self._on_quote(quote)

    async def _watch_silence(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._silence / 4))
            if loop.time() - self._last_rx > self._silence:
                log.warning("upstream silent", extra={"seconds": self._silence})
                # Aborting the transport makes the reader's `async for` end at once.
                ws.transport.abort()
                raise UpstreamSilent()

    def _notice(self, raw: str | bytes) -> None:
        metrics.NOTICES.inc()
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        log.warning("vendor notice", extra={"text": text[:200]})
