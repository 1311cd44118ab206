"""A simulated kabuステーション: the REST endpoints the ingestor uses and the PUSH socket, under
/kabusapi, with the real one's rules: one valid token (a new one revokes the old), X-API-KEY on
every call, at most 50 registered symbols, errors as {"Code": ..., "Message": ...}.

For tests: `token_ttl` ends the token like the early-morning forced logout (registrations are
dropped and push sockets closed); GET /_sim/status says what it holds; POST /_sim/logout logs out;
`register_elsewhere()` / `unregister_elsewhere()` are another app changing the shared list; a
symbol in `unlisted` is accepted by PUT /register but left out of its RegistList; `full_code` is
the code a registration over the limit gets (4002006, 4001018, or 4001019, which registers what
fits first); `max_calls` per second are answered, the rest get HTTP 429 with 4001006.
Unregistering a symbol that is not registered gets 4001020 (4001021 when only some are not).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from ingestor.vendors.kabu import (
    CALLS_EXCEEDED,
    JST,
    REGISTER_LIMIT,
    REGISTER_PARTLY,
    SYMBOL_NOT_FOUND,
    TOKEN_MISMATCH,
    UNREGISTER_FAILED,
    UNREGISTER_PARTLY,
    WRONG_PASSWORD,
    join_symbol,
)
from shared.settings import KABU_MAX_SYMBOLS

log = logging.getLogger("fxproxy.simkabu")

# Late-2024 prices of a few Tokyo Stock Exchange names (market 1): code@exchange -> (price, name).
STOCKS: dict[str, tuple[float, str]] = {
    "9433@1": (4300.0, "KDDI"),
    "7203@1": (2900.0, "トヨタ自動車"),
    "6758@1": (3100.0, "ソニーグループ"),
    "9984@1": (8800.0, "ソフトバンクグループ"),
    "8306@1": (1800.0, "三菱UFJフィナンシャル・グループ"),
    "9432@1": (150.0, "日本電信電話"),
    "6861@1": (60000.0, "キーエンス"),
    "8035@1": (24000.0, "東京エレクトロン"),
    "4063@1": (5800.0, "信越化学工業"),
    "7974@1": (8700.0, "任天堂"),
    "9983@1": (52000.0, "ファーストリテイリング"),
    "6501@1": (3900.0, "日立製作所"),
    "4502@1": (4200.0, "武田薬品工業"),
    "8058@1": (3200.0, "三菱商事"),
    "5401@1": (2100.0, "日本製鉄"),
    "6098@1": (6300.0, "リクルートホールディングス"),
}


def tick_size(price: float) -> float:
    """A simplified TSE tick table: the quote moves in these steps."""
    for below, tick in ((3000.0, 0.5), (5000.0, 1.0), (30000.0, 5.0), (50000.0, 10.0)):
        if price < below:
            return tick
    return 50.0


@dataclass(slots=True)
class Board:
    """One stock's best quotes taking random steps, a tick apart."""

    price: float
    name: str
    rng: random.Random
    volume: float = 0.0

    def step(self) -> tuple[float, float]:
        tick = tick_size(self.price)
        self.price = max(tick, self.price + tick * self.rng.choice((-1, 0, 0, 1)))
        self.volume += 100 * self.rng.randint(1, 20)
        return self.price, self.price + tick  # best buy, best sell


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response({"Code": code, "Message": message}, status=status,
                             dumps=lambda o: orjson.dumps(o).decode())


def _ok(obj: Any) -> web.Response:
    return web.json_response(obj, dumps=lambda o: orjson.dumps(o).decode())


def board_push(symbol: str, board: Board, buy: float, sell: float) -> dict[str, Any]:
    """The PUSH message kabuステーション sends: the /board fields, with their inverted names."""
    code, _, exchange = symbol.partition("@")
    now = datetime.now(JST).replace(microsecond=0).isoformat()
    return {
        "Symbol": code, "SymbolName": board.name, "Exchange": int(exchange), "ExchangeName": "東証プ",
        "CurrentPrice": buy, "CurrentPriceTime": now, "CurrentPriceChangeStatus": "0057",
        "CurrentPriceStatus": 1, "CalcPrice": buy, "TradingVolume": board.volume,
        "BidQty": 100.0, "BidPrice": sell, "BidTime": now, "BidSign": "0101",  # best SELL quote
        "Sell1": {"Time": now, "Sign": "0101", "Price": sell, "Qty": 100.0},
        "AskQty": 200.0, "AskPrice": buy, "AskTime": now, "AskSign": "0101",  # best BUY quote
        "Buy1": {"Time": now, "Sign": "0101", "Price": buy, "Qty": 200.0},
    }


class SimKabu:
    def __init__(self, password: str, rate: float, *, max_symbols: int = 0, token_ttl: float = 0.0,
                 seed: int | None = None, full_code: int = REGISTER_LIMIT, max_calls: float = 0.0) -> None:
        self._password = password
        self.full_code = full_code
        self._max_calls = max_calls
        self._allowance = max_calls
        self._allowance_at = 0.0
        self.calls = 0  # REST calls answered (throttled ones not counted)
        self.throttled = 0
        self._rate = rate
        self._max_symbols = max_symbols or KABU_MAX_SYMBOLS
        self._ttl = token_ttl
        rng = random.Random(seed)
        self._boards = {s: Board(price, name, rng) for s, (price, name) in STOCKS.items()}
        self.token = ""
        self.tokens_issued = 0
        self.logouts = 0
        self.registered: list[str] = []
        self.unlisted: set[str] = set()
        self.cleared_all = 0  # PUT /unregister/all calls: every app's registrations gone
        self._sockets: set[web.WebSocketResponse] = set()
        self._expires_at = 0.0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, host: str, port: int) -> int:
        app = web.Application(middlewares=[self._throttle])
        app.add_routes([
            web.post("/kabusapi/token", self._token),
            web.put("/kabusapi/register", self._register),
            web.put("/kabusapi/unregister", self._unregister),
            web.put("/kabusapi/unregister/all", self._unregister_all),
            web.get("/kabusapi/websocket", self._push),
            web.get("/_sim/status", self._status),
            web.post("/_sim/logout", self._logout_now),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._tasks = [asyncio.create_task(self._pushing()), asyncio.create_task(self._expiring())]
        log.info("simkabu listening", extra={"host": host, "port": bound, "stocks": len(STOCKS)})
        return bound

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _throttle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """At most `max_calls` REST calls a second (a token bucket of that burst); the rest 429."""
        if self._max_calls and request.path.startswith("/kabusapi/") and request.method != "GET":
            now = asyncio.get_running_loop().time()
            self._allowance = min(self._max_calls,
                                  self._allowance + (now - self._allowance_at) * self._max_calls)
            self._allowance_at = now
            if self._allowance < 1.0:
                self.throttled += 1
                return _error(429, CALLS_EXCEEDED, "API実行回数エラー")
            self._allowance -= 1.0
        self.calls += 1
        response: web.StreamResponse = await handler(request)
        return response

    async def _token(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        password = body.get("APIPassword") if isinstance(body, dict) else None
        if not isinstance(password, str) or not hmac.compare_digest(password.encode(),
                                                                    self._password.encode()):
            log.info("refused a token request: wrong API password")
            return _error(400, WRONG_PASSWORD, "APIパスワード不正")
        self.token = secrets.token_hex(16)  # the previous token stops working, as in the real API
        self.tokens_issued += 1
        self._expires_at = asyncio.get_running_loop().time() + self._ttl if self._ttl else 0.0
        log.info("token issued", extra={"tokens_issued": self.tokens_issued})
        return _ok({"ResultCode": 0, "Token": self.token})

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("X-API-KEY", "")
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    async def _symbols(self, request: web.Request) -> list[str] | web.Response:
        """The symbols of a register/unregister body, or the error answer."""
        if not self._authorized(request):
            return _error(401, TOKEN_MISMATCH, "APIキー不一致")
        body = await self._json(request)
        items = body.get("Symbols") if isinstance(body, dict) else None
        if not isinstance(items, list):
            return _error(400, 4001005, "パラメータ変換エラー")
        out = []
        for item in items:
            code = item.get("Symbol") if isinstance(item, dict) else None
            exchange = item.get("Exchange") if isinstance(item, dict) else None
            symbol = join_symbol(str(code) if isinstance(code, int | str) else None, exchange)
            if symbol is None:
                return _error(400, 4001005, "パラメータ変換エラー")
            out.append(symbol)
        return out

    async def _register(self, request: web.Request) -> web.Response:
        symbols = await self._symbols(request)
        if isinstance(symbols, web.Response):
            return symbols
        if any(s not in self._boards for s in symbols):
            return _error(400, SYMBOL_NOT_FOUND, "銘柄が見つからない")
        new = [s for s in dict.fromkeys(symbols) if s not in self.registered and s not in self.unlisted]
        if len(self.registered) + len(new) > self._max_symbols:
            log.info("refused a registration over the limit",
                     extra={"registered": len(self.registered), "asked": len(new), "code": self.full_code})
            if self.full_code == REGISTER_PARTLY:
                self.registered += new[:max(0, self._max_symbols - len(self.registered))]
                return _error(400, REGISTER_PARTLY, "一部の銘柄が登録できませんでした")
            return _error(400, self.full_code, "銘柄が登録できませんでした")
        self.registered += new
        log.info("registered", extra={"symbols": new, "registered": len(self.registered)})
        return self._regist_list()

    def register_elsewhere(self, symbols: Iterable[str]) -> None:
        """Another app's registrations: the list is kabuステーション's, so they count toward its limit."""
        self.registered += [s for s in dict.fromkeys(symbols) if s not in self.registered]

    def unregister_elsewhere(self, symbols: Iterable[str]) -> None:
        """Another app (or a person at kabuステーション) unregisters: ours too, if it names them."""
        gone = set(symbols)
        self.registered = [s for s in self.registered if s not in gone]

    async def _unregister(self, request: web.Request) -> web.Response:
        symbols = await self._symbols(request)
        if isinstance(symbols, web.Response):
            return symbols
        missing = [s for s in symbols if s not in self.registered]
        self.registered = [s for s in self.registered if s not in symbols]
        log.info("unregistered", extra={"symbols": symbols, "registered": len(self.registered),
                                        "not_registered": missing})
        if missing and len(missing) == len(symbols):
            return _error(400, UNREGISTER_FAILED, "銘柄が解除できませんでした")
        if missing:
            return _error(400, UNREGISTER_PARTLY, "一部の銘柄が解除できませんでした")
        return self._regist_list()

    async def _unregister_all(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, TOKEN_MISMATCH, "APIキー不一致")
        self.cleared_all += 1
        self.registered = []
        return _ok({"RegistList": []})

    def _regist_list(self) -> web.Response:
        items = []
        for symbol in self.registered:
            code, _, exchange = symbol.partition("@")
            items.append({"Symbol": code, "Exchange": int(exchange)})
        return _ok({"RegistList": items})

    async def _push(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.add(ws)
        log.info("push socket opened", extra={"sockets": len(self._sockets)})
        try:
            async for msg in ws:  # receive-only for the client; read to see pings and the close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
        return ws

    async def _status(self, request: web.Request) -> web.Response:
        return _ok({"tokens_issued": self.tokens_issued, "logouts": self.logouts,
                    "registered": self.registered, "push_sockets": len(self._sockets)})

    async def _logout_now(self, request: web.Request) -> web.Response:
        await self._logout()
        return _ok({"logouts": self.logouts})

    async def _logout(self) -> None:
        """What the forced logout does: the token ends, registrations go, push sockets close."""
        self.token = ""
        self._expires_at = 0.0
        self.registered = []
        self.logouts += 1
        log.info("logged out: token revoked, registrations dropped", extra={"logouts": self.logouts})
        for ws in list(self._sockets):
            await ws.close()

    async def _expiring(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.05)
            if self._expires_at and loop.time() >= self._expires_at:
                await self._logout()

    async def _pushing(self) -> None:
        """Each registered symbol's board `rate` times a second, to every push socket."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        i = 0
        while True:
            symbols = self.registered
            if not symbols or not self._sockets:
                await asyncio.sleep(0.05)
                next_at = loop.time()
                continue
            symbol = symbols[i % len(symbols)]
            i += 1
            board = self._boards[symbol]
            buy, sell = board.step()
            frame = orjson.dumps(board_push(symbol, board, buy, sell)).decode()
            for ws in list(self._sockets):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(frame)
            next_at += 1.0 / (self._rate * len(symbols))
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_at = loop.time()

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None
