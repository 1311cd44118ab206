"""The TraderMade streaming dialect: login over the WebSocket, ticks as JSON texts.

Sans-I/O part (login frame, tick and notice parsing) first, then the session driver.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection, Mapping, Sequence

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from ingestor.backoff import Backoff
from ingestor.vendors.base import SILENT, Hooks
from ingestor.vendors.supervise import Supervised, UpstreamSilent
from shared.tick import Quote, is_symbol

log = logging.getLogger("fxproxy.ingestor.tradermade")

GREETING = "Connected"
# What the simulator says after a login naming symbols it does not carry. The real feed says
# nothing: a symbol that has not quoted while the session was receiving other symbols' quotes for
# FIRST_QUOTE_MIN (or 3 silence timeouts, if longer) is reported SILENT, so an on-demand symbol
# the feed lacks does not hold a session's place for ever. Time with no quotes at all (a closed
# market, a dead link) does not count: a silent feed proves nothing about any symbol.
UNKNOWN_PREFIX = "Unknown symbols: "
FIRST_QUOTE_MIN = 15.0


class MalformedMessage(ValueError):
    pass


def login_frame(user_key: str, symbols: Sequence[str]) -> str:
    return orjson.dumps({"userKey": user_key, "symbol": ",".join(symbols)}).decode()


def unknown_symbols(text: str) -> list[str]:
    """The symbols a notice says the feed does not carry (none for any other notice)."""
    if not text.startswith(UNKNOWN_PREFIX):
        return []
    return [s.strip() for s in text[len(UNKNOWN_PREFIX):].split(",") if s.strip()]


def _price(d: dict[str, object], name: str) -> float:
    value = d.get(name)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise MalformedMessage(f"{name} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedMessage(f"{name} is missing or not a finite number")
    return float(value)


def parse_message(raw: str | bytes) -> Quote | None:
    """A quote, or None for a text the vendor sends between ticks (greeting, notices).

    Raises MalformedMessage for anything that looks like a tick but isn't one.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if not text.lstrip().startswith("{"):
        return None
    try:
        d = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"invalid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise MalformedMessage("not a JSON object")
    symbol = d.get("symbol")
    if not is_symbol(symbol):
        raise MalformedMessage(f"bad symbol {str(symbol)[:20]!r}")
    assert isinstance(symbol, str)
    bid, ask = _price(d, "bid"), _price(d, "ask")
    mid = _price(d, "mid") if "mid" in d else (bid + ask) / 2
    ts = d.get("ts")
    try:
        ts_ms = int(ts) if isinstance(ts, str | int) and not isinstance(ts, bool) else None
    except ValueError:
        ts_ms = None
    if ts_ms is None or ts_ms < 0:
        raise MalformedMessage("ts is missing or not an integer timestamp")
    return Quote(symbol, bid, ask, mid, ts_ms)


class TraderMadeSession(Supervised):
    """One TraderMade-style connection. A new symbol set is sent as a fresh login frame on the open
    connection, so the symbols that stay keep streaming. A symbol that has not quoted while others
    did for the first-quote deadline is reported SILENT (the vendor's notice, `unknown`)."""

    errors = (OSError, TimeoutError, WebSocketException, UpstreamSilent)

    def __init__(
        self,
        urls: Sequence[str],
        user_key: str,
        symbols: Collection[str],
        hooks: Hooks,
        *,
        headers: Mapping[str, str] | None = None,
        silence_timeout: float = 10.0,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        connected: asyncio.Event | None = None,
        label: str = "0",
        first_quote_timeout: float | None = None,
    ) -> None:
        super().__init__(urls, symbols, hooks, silence_timeout=silence_timeout, backoff=backoff,
                         open_timeout=open_timeout, connected=connected, label=label)
        self._user_key = user_key
        self._headers = dict(headers or {})
        self._resend = asyncio.Event()
        self._streaming: set[str] = set()  # symbols this login has delivered (reported once)
        self._first_quote = (first_quote_timeout if first_quote_timeout is not None
                             else max(FIRST_QUOTE_MIN, 3 * silence_timeout))
        # Symbols that have not quoted on this session since they were added, and for how many
        # seconds the feed has been live (delivering others' quotes) since. Kept across logins.
        self._pending: dict[str, float] = dict.fromkeys(self._symbols, 0.0)
        self._live = False  # a quote arrived since the pending clock last looked

    def _changed(self, old: frozenset[str]) -> None:
        for symbol in old - self._symbols:
            self._pending.pop(symbol, None)
        for symbol in self._symbols - old:
            self._pending[symbol] = 0.0
        self._resend.set()

    def _login(self) -> str:
        return login_frame(self._user_key, sorted(self._symbols))

    async def _connect(self, url: str) -> None:
        async with connect(
            url,
            additional_headers=self._headers,
            open_timeout=self._open_timeout,
            ping_interval=None,  # silence detection covers a dead peer
            max_size=2**20,
            compression=None,
        ) as ws:
            greeting = await asyncio.wait_for(ws.recv(), self._open_timeout)
            if greeting != GREETING:
                self._notice(greeting)
            self._resend.clear()
            self._streaming.clear()
            await ws.send(self._login())
            self._logged_in(url)
            watchdog = asyncio.create_task(self._watch_silence(ws.transport.abort))
            tasks = (watchdog, asyncio.create_task(self._resend_changes(ws)),
                     asyncio.create_task(self._expire_pending()), asyncio.create_task(self._read(ws)))
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                # Every outcome retrieved here; the one that ended the link is raised below.
                ended = await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(ended[0], Exception):
                raise UpstreamSilent(f"no data for {self._silence:g}s")
            # A failed send (resender) or a broken link (reader): the first that is not a cancel.
            failed = [e for e in ended[1:] if isinstance(e, Exception)]
            if failed:
                raise failed[0]

    async def _resend_changes(self, ws: ClientConnection) -> None:
        while True:
            await self._resend.wait()
            self._resend.clear()
            self._streaming &= self._symbols
            await ws.send(self._login())

    async def _expire_pending(self) -> None:
        """Report SILENT for each symbol that has waited out the first-quote deadline on a live
        feed: the clock runs only over steps in which some quote arrived."""
        loop = asyncio.get_running_loop()
        step = min(1.0, self._first_quote / 4, self._silence / 4)
        last, self._live = loop.time(), False
        while True:
            await asyncio.sleep(step)
            now = loop.time()
            waited, last = now - last, now
            live, self._live = self._live, False
            if not live:
                continue
            for symbol in sorted(self._pending):
                self._pending[symbol] += waited
                if self._pending[symbol] >= self._first_quote:
                    del self._pending[symbol]
                    log.warning("no first quote while others quoted: taken as not carried", extra={
                        "symbol": symbol, "seconds": self._first_quote, "session": self.label})
                    self._hooks.on_status(symbol, SILENT)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            self._heard()
            try:
                quote = parse_message(raw)
            except MalformedMessage as exc:
                self._malformed(exc, raw)
                continue
            if quote is None:
                self._notice(raw)
                text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
                for symbol in unknown_symbols(text):
                    if symbol in self._symbols:
                        self._pending.pop(symbol, None)
                        self._hooks.on_status(symbol, "unknown")
                continue
            self._live = True
            self._pending.pop(quote.symbol, None)
            if quote.symbol not in self._streaming and quote.symbol in self._symbols:
                self._streaming.add(quote.symbol)
                self._hooks.on_status(quote.symbol, "streaming")
            self._deliver(quote)
