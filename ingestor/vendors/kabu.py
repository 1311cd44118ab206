"""The kabuステーション dialect: a token and symbol registration over REST, board pushes over a
WebSocket (ws://host:port/kabusapi/websocket, derived from the REST base).

Sans-I/O part (symbols, request bodies, responses, errors, pushes) first, then the session driver.
The board's names are the exchange's view, inverted from the usual one: `BidPrice` is the best
*sell* quote (最良売気配, what a buyer pays: our ask) and `AskPrice` the best *buy* quote (最良買気配,
our bid). `Sell1.Price == BidPrice` and `Buy1.Price == AskPrice` in the reference's example.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from ingestor.backoff import Backoff
from ingestor.vendors.base import Hooks, VendorError
from ingestor.vendors.supervise import Supervised, UpstreamSilent
from shared.tick import Quote, is_symbol

log = logging.getLogger("fxproxy.ingestor.kabu")

JST = timezone(timedelta(hours=9))
# Codes of the reference's REST API code list that the driver acts on.
TOKEN_MISMATCH = 4001009  # APIキー不一致: the token was replaced or kabuステーション logged out
WRONG_PASSWORD = 4001013  # APIパスワード不正 (on POST /token)
SYMBOL_NOT_FOUND = 4002001  # 銘柄が見つからない
REGISTER_LIMIT = 4002006  # 登録銘柄数上限: the registration list holds 50 symbols


class MalformedPush(ValueError):
    pass


def split_symbol(symbol: str) -> tuple[str, int]:
    """'9433@1' -> ('9433', 1): the code and the market (1 Tokyo, 3 Nagoya, 5 Fukuoka, 6 Sapporo)."""
    code, at, exchange = symbol.partition("@")
    if not at or not code or not exchange.isdigit():
        raise ValueError(f"kabu symbols look like 9433@1 (code@exchange), not {symbol!r}")
    return code, int(exchange)


def join_symbol(code: object, exchange: object) -> str | None:
    if not isinstance(code, str) or isinstance(exchange, bool) or not isinstance(exchange, int):
        return None
    symbol = f"{code}@{exchange}"
    return symbol if is_symbol(symbol) else None


def push_url(base: str) -> str:
    """http://host:18080/kabusapi -> ws://host:18080/kabusapi/websocket"""
    parts = urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/websocket", "", ""))


def token_body(password: str) -> bytes:
    return orjson.dumps({"APIPassword": password})


def symbols_body(symbols: Iterable[str]) -> bytes:
    """The body of PUT /register and PUT /unregister."""
    out = []
    for symbol in sorted(symbols):
        code, exchange = split_symbol(symbol)
        out.append({"Symbol": code, "Exchange": exchange})
    return orjson.dumps({"Symbols": out})


def check(status: int, body: bytes) -> Any:
    """The decoded JSON of a 200 answer; any other answer raises VendorError with its Code/Message."""
    try:
        obj = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        obj = None
    if status == 200 and obj is not None:
        return obj
    code = obj.get("Code") if isinstance(obj, dict) else None
    message = obj.get("Message") if isinstance(obj, dict) else None
    text = str(message)[:200] if message is not None else body[:200].decode("utf-8", "replace")
    raise VendorError(f"HTTP {status}: {text or 'no body'}",
                      code if isinstance(code, int) and not isinstance(code, bool) else None, status)


def parse_token(obj: Any) -> str:
    token = obj.get("Token") if isinstance(obj, dict) else None
    if not isinstance(token, str) or not token or obj.get("ResultCode", 0) != 0:
        # The error is logged: name the answer's ResultCode and Message, never its Token.
        result = obj.get("ResultCode") if isinstance(obj, dict) else None
        message = obj.get("Message") if isinstance(obj, dict) else None
        said = f", Message {str(message)[:120]!r}" if message is not None else ""
        raise VendorError(f"no token in the answer (ResultCode {str(result)[:20]}{said})",
                          result if isinstance(result, int) and not isinstance(result, bool) else None)
    return token


def parse_registered(obj: Any) -> set[str]:
    """The symbols of a register/unregister answer's RegistList (the whole list now registered)."""
    items = obj.get("RegistList") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise VendorError(f"no RegistList in the answer: {str(obj)[:120]}")
    out = set()
    for item in items:
        if isinstance(item, dict):
            symbol = join_symbol(item.get("Symbol"), item.get("Exchange"))
            if symbol is not None:
                out.add(symbol)
    return out


def parse_time(value: object) -> int | None:
    """'2020-07-22T15:00:00+09:00' -> ms since the epoch; a time without an offset is Tokyo's."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=JST)
    return int(when.timestamp() * 1000)


def _price(d: dict[str, Any], name: str) -> float | None:
    value = d.get(name)
    if value is None:
        return None  # no quote on that side yet (before the open, a halted board)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedPush(f"{name} is not a finite number")
    return float(value)


def parse_push(raw: str | bytes) -> Quote | None:
    """A quote from one board push, or None when the board has no two-sided quote yet.

    Raises MalformedPush for anything that is not a board push.
    """
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedPush(f"invalid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise MalformedPush("not a JSON object")
    symbol = join_symbol(d.get("Symbol"), d.get("Exchange"))
    if symbol is None:
        raise MalformedPush(f"bad Symbol/Exchange {str(d.get('Symbol'))[:20]!r}@{d.get('Exchange')!r}")
    # Inverted names (see the module docstring): the best buy quote is AskPrice.
    bid, ask = _price(d, "AskPrice"), _price(d, "BidPrice")
    if bid is None or ask is None:
        return None
    times = [t for t in map(parse_time, (d.get("BidTime"), d.get("AskTime"), d.get("CurrentPriceTime")))
             if t is not None]
    if not times:
        raise MalformedPush("no BidTime, AskTime or CurrentPriceTime")
    return Quote(symbol, bid, ask, (bid + ask) / 2, max(times))


class KabuSession(Supervised):
    """One kabuステーション: token, registration of the session's symbols, then its push socket.
    A changed set is applied with PUT /register and /unregister, the others streaming on. A token
    refused (401) is fetched again and the request retried once; a push socket that closes (the
    token expired, kabuステーション restarted) starts over: new token, registration, socket."""

    errors = (OSError, TimeoutError, aiohttp.ClientError, UpstreamSilent, VendorError)

    def __init__(
        self,
        url: str,
        password: str,
        symbols: Collection[str],
        hooks: Hooks,
        *,
        silence_timeout: float = 10.0,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        connected: asyncio.Event | None = None,
        label: str = "0",
    ) -> None:
        super().__init__([url], symbols, hooks, silence_timeout=silence_timeout, backoff=backoff,
                         open_timeout=open_timeout, connected=connected, label=label)
        self._password = password
        self._token = ""
        self._registered: set[str] = set()  # ours on kabuステーション's list
        self._refused: set[str] = set()  # not in its catalogue: not asked for again while wanted
        self._fresh = True  # no login yet: the list may hold registrations nobody reads any more
        self._apply = asyncio.Event()

    def _changed(self, old: frozenset[str]) -> None:
        self._refused &= self._symbols  # given back and asked for again later: tried afresh
        self._apply.set()

    async def _connect(self, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=self._open_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self._http, self._base = http, url.rstrip("/")
            # Registered before and not wanted now: unregistered below, so kabuステーション's list
            # (50 for every app together) does not fill up. The rest is registered again: after a
            # forced logout or a restart the list is empty.
            self._registered -= self._symbols
            self._apply.clear()
            await self._new_token()
            if self._fresh:
                await self._clear_stale()
            await self._reconcile()
            # Board pushes come only on a change, and a quiet stock may not change for minutes:
            # liveness is the socket's pings (a pong missing for half the interval closes it).
            async with http.ws_connect(push_url(url), heartbeat=self._silence / 1.5,
                                       max_msg_size=2**20, timeout=aiohttp.ClientWSTimeout(
                                           ws_receive=None, ws_close=self._open_timeout)) as ws:
                self._logged_in(url)
                applier = asyncio.create_task(self._apply_changes(ws))
                try:
                    await self._read(ws)
                finally:
                    applier.cancel()
                failed = applier.exception() if applier.done() and not applier.cancelled() else None
                if failed is not None:
                    raise failed

    async def _request(self, method: str, path: str, body: bytes, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["X-API-KEY"] = self._token
        async with self._http.request(method, self._base + path, data=body, headers=headers) as resp:
            return check(resp.status, await resp.read())

    async def _authorized(self, method: str, path: str, body: bytes) -> Any:
        try:
            return await self._request(method, path, body)
        except VendorError as exc:
            if exc.status != 401 and exc.code != TOKEN_MISMATCH:
                raise
        log.info("kabu token refused: fetching a new one", extra={"session": self.label})
        await self._new_token()
        return await self._request(method, path, body)

    async def _new_token(self) -> None:
        self._token = parse_token(await self._request("POST", "/token", token_body(self._password),
                                                      auth=False))

    async def _clear_stale(self) -> None:
        """Empty the list once per session: what an earlier owner of this kabuステーション left
        (another app, a crashed or failed-over ingestor, a pool slot closed by cancel) would
        otherwise hold places of the 50 until the early-morning logout."""
        listed = parse_registered(await self._authorized("PUT", "/unregister/all", b""))
        self._registered &= listed
        self._fresh = False
        log.info("kabu registrations cleared", extra={"session": self.label, "left": len(listed)})

    async def _apply_changes(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Apply each change; a failed one ends the session (closing its socket ends the reader)."""
        try:
            while True:
                await self._apply.wait()
                self._apply.clear()
                await self._reconcile()
        except Exception:
            await ws.close()
            raise

    async def _reconcile(self) -> None:
        """Register what the set gained, unregister what it lost. What finds the list full is
        reported `capacity` and asked for again at the next change."""
        wanted = set(self._symbols) - self._refused
        gone = self._registered - wanted
        if gone:
            listed = parse_registered(await self._authorized("PUT", "/unregister", symbols_body(gone)))
            self._registered &= listed
        new = wanted - self._registered
        if not new:
            return
        full: set[str] = set()
        try:
            listed = parse_registered(await self._authorized("PUT", "/register", symbols_body(new)))
        except VendorError as exc:
            if exc.code not in (SYMBOL_NOT_FOUND, REGISTER_LIMIT):
                raise
            # Either fails the whole request and the answer does not say which symbol: asked one
            # at a time, what fits is kept and only the rest waits for room (no new login: it
            # would find the list as full as now).
            listed, full = await self._register_one_by_one(new)
        added = new & listed
        for symbol in sorted(added):
            self._hooks.on_status(symbol, "streaming")
        for symbol in sorted(full):
            self._hooks.on_status(symbol, "capacity")
        for symbol in sorted(new - listed - full - self._refused):
            # Accepted without an error yet not on the list: nothing will come for it.
            log.warning("kabu symbol left out of the registration list",
                        extra={"symbol": symbol, "session": self.label})
            self._hooks.on_status(symbol, "unknown")
        self._registered |= added

    async def _register_one_by_one(self, symbols: set[str]) -> tuple[set[str], set[str]]:
        """The list after registering `symbols` one at a time, and those there was no room for."""
        listed: set[str] = set()
        full: set[str] = set()
        for symbol in sorted(symbols):
            if full:
                full.add(symbol)  # the list is full: asking again would only be refused again
                continue
            try:
                listed = parse_registered(await self._authorized("PUT", "/register", symbols_body([symbol])))
            except VendorError as exc:
                if exc.code == REGISTER_LIMIT:
                    log.warning("kabu registration list full", extra={
                        "symbol": symbol, "session": self.label, "registered": len(self._registered)})
                    full.add(symbol)
                    continue
                if exc.code != SYMBOL_NOT_FOUND:
                    raise
                log.warning("kabu symbol not found", extra={"symbol": symbol, "session": self.label})
                self._refused.add(symbol)
                self._hooks.on_status(symbol, "unknown")
        return listed, full

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                break
            self._heard()
            try:
                quote = parse_push(msg.data)
            except MalformedPush as exc:
                self._malformed(exc, msg.data)
                continue
            # The list is kabuステーション's, shared with any other app: only our symbols go on.
            if quote is not None and quote.symbol in self._registered:
                self._deliver(quote)
