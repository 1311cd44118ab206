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
# Codes of the reference's REST API code list (ptal/error.html) that the driver acts on.
CALLS_EXCEEDED = 4001006  # API実行回数エラー: too many calls (HTTP 429 is the throttle too)
TOKEN_MISMATCH = 4001009  # APIキー不一致: the token was replaced or kabuステーション logged out
WRONG_PASSWORD = 4001013  # APIパスワード不正 (on POST /token)
REGISTER_FAILED = 4001018  # 銘柄が登録できませんでした: the list (50 symbols) has no room
REGISTER_PARTLY = 4001019  # 一部の銘柄が登録できませんでした: room for some only
UNREGISTER_FAILED = 4001020  # 銘柄が解除できませんでした: not registered (any more)
UNREGISTER_PARTLY = 4001021  # 一部の銘柄が解除できませんでした
SYMBOL_NOT_FOUND = 4002001  # 銘柄が見つからない
REGISTER_LIMIT = 4002006  # レジスト数エラー: the registration list holds 50 symbols
LIST_FULL = frozenset({REGISTER_LIMIT, REGISTER_FAILED, REGISTER_PARTLY})
NOT_REGISTERED = frozenset({UNREGISTER_FAILED, UNREGISTER_PARTLY})
# Seconds between re-registrations of the whole set: the list is shared, and another app (or a
# person at kabuステーション) may unregister ours without telling us.
RECHECK_INTERVAL = 30.0
THROTTLE_INITIAL, THROTTLE_MAX = 0.2, 5.0  # seconds: backoff of a call refused as too many


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
    """The body of PUT /register and PUT /unregister, in the order given (priority: a list with
    room for only some may take the first)."""
    out = []
    for symbol in symbols:
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
    A changed set is applied with PUT /register and /unregister, the others streaming on; the
    whole set is registered again every RECHECK_INTERVAL, so registrations another app removed
    come back. A token refused (401) is fetched again and the request retried once; a call refused
    as too many (429, 4001006) is retried after a backoff; a push socket that closes (the token
    expired, kabuステーション restarted) starts over: new token, registration, socket."""

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
        recheck_interval: float | None = None,
    ) -> None:
        super().__init__([url], symbols, hooks, silence_timeout=silence_timeout, backoff=backoff,
                         open_timeout=open_timeout, connected=connected, label=label)
        self._password = password
        self._recheck = RECHECK_INTERVAL if recheck_interval is None else recheck_interval
        self._token = ""
        self._registered: set[str] = set()  # ours on kabuステーション's list, as its last answer said
        self._refused: set[str] = set()  # not in its catalogue: not asked for again while wanted
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
            # forced logout or a restart the list is empty. What other apps registered is theirs:
            # never cleared (no PUT /unregister/all).
            self._registered -= self._symbols
            self._apply.clear()
            await self._new_token()
            await self._sync(everything=True)
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
        """One call; refused as too many (429, 4001006), it is made again after a backoff."""
        delay = THROTTLE_INITIAL
        while True:
            headers = {"Content-Type": "application/json"}
            if auth:
                headers["X-API-KEY"] = self._token
            async with self._http.request(method, self._base + path, data=body, headers=headers) as resp:
                status, answer = resp.status, await resp.read()
            try:
                return check(status, answer)
            except VendorError as exc:
                if exc.status != 429 and exc.code != CALLS_EXCEEDED:
                    raise
            log.warning("kabu call refused as too many: backing off", extra={
                "session": self.label, "path": path, "in_s": round(delay, 2)})
            await asyncio.sleep(delay)
            delay = min(THROTTLE_MAX, delay * 2)

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

    async def _apply_changes(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Apply each change, and register the whole set again every recheck interval; a failed
        call ends the session (closing its socket ends the reader)."""
        loop = asyncio.get_running_loop()
        recheck_at = loop.time() + self._recheck
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, recheck_at - loop.time())):
                        await self._apply.wait()
                except TimeoutError:
                    pass
                self._apply.clear()
                everything = loop.time() >= recheck_at
                if everything:
                    recheck_at = loop.time() + self._recheck
                await self._sync(everything)
        except Exception:
            await ws.close()
            raise

    async def _sync(self, everything: bool = False) -> None:
        """Unregister what the set lost; register what it gained, or (`everything`) the whole set
        again, which puts back what was removed behind our back."""
        order = [s for s in self._order if s not in self._refused]
        gone = self._registered - set(order)
        if gone:
            await self._unregister(gone)
        ask = order if everything else [s for s in order if s not in self._registered]
        if ask:
            await self._register(ask)

    async def _unregister(self, gone: set[str]) -> None:
        try:
            listed = parse_registered(await self._authorized("PUT", "/unregister",
                                                             symbols_body(sorted(gone))))
        except VendorError as exc:
            if exc.code not in NOT_REGISTERED:
                raise
            # Not (all) registered any more: a forced logout, a restart, another app's unregister.
            # Gone is what we wanted; the next full registration corrects anything else.
            log.info("kabu symbols were no longer registered", extra={
                "session": self.label, "symbols": sorted(gone), "code": exc.code})
            listed = self._registered - gone
        self._registered = (self._registered - gone) & listed

    async def _register(self, ask: list[str]) -> None:
        """Register `ask` (priority order) and report each symbol's fate: streaming when it joins
        the list, capacity when the list has no room for it, unknown when the answer leaves it out."""
        before = set(self._registered)
        full: list[str] = []
        try:
            listed = parse_registered(await self._authorized("PUT", "/register", symbols_body(ask)))
        except VendorError as exc:
            if exc.code != SYMBOL_NOT_FOUND and exc.code not in LIST_FULL:
                raise
            # These fail the whole request (or part of it) and do not say which symbol: asked one
            # at a time, what fits is kept and only the rest waits for room (no new login: it
            # would find the list as full as now).
            listed, full = await self._register_one_by_one(ask)
        # The answer is the whole list now: ours are what we asked for or had, and it still holds.
        self._registered = (self._registered | set(ask)) & listed
        for symbol in ask:
            if symbol in self._registered and symbol not in before:
                self._hooks.on_status(symbol, "streaming")
        for symbol in full:
            self._hooks.on_status(symbol, "capacity")
        for symbol in ask:
            if symbol not in listed and symbol not in full and symbol not in self._refused:
                # Accepted without an error yet not on the list: nothing will come for it.
                log.warning("kabu symbol left out of the registration list",
                            extra={"symbol": symbol, "session": self.label})
                self._hooks.on_status(symbol, "unknown")

    async def _register_one_by_one(self, symbols: list[str]) -> tuple[set[str], list[str]]:
        """The list after registering `symbols` one at a time (priority order), and those there
        was no room for. Once the list is full, only ours already on it are asked again."""
        listed = set(self._registered)
        full: list[str] = []
        for symbol in symbols:
            if full and symbol not in self._registered:
                full.append(symbol)  # the list is full: asking would only be refused again
                continue
            try:
                listed = parse_registered(await self._authorized("PUT", "/register", symbols_body([symbol])))
            except VendorError as exc:
                if exc.code in LIST_FULL:
                    log.warning("kabu registration list full", extra={
                        "symbol": symbol, "session": self.label, "registered": len(self._registered)})
                    full.append(symbol)
                    listed.discard(symbol)
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
