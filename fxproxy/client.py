"""A resuming client for fxproxy edges: connect, subscribe, iterate events, reconnect by itself.

    async with Client("ws://127.0.0.1:8080/v1/stream", key, ["EURUSD", "GBPUSD"]) as client:
        async for event in client:
            if isinstance(event, Tick):
                print(event.symbol, event.bid, event.ask)

On any disconnect it reconnects (the next URL of its list, jittered exponential backoff) and
resubscribes every symbol with `since` = the last position it saw, following the close code
table of the README: 1001 at once; 1013, 4008, HTTP 429/503 with backoff; 4001, 4003, 1007,
1008, 1009 and HTTP 401/403 stop it with a typed `ClientError`.

`Positions` is the sans-I/O bookkeeping: it judges every tick against the last position of its
symbol and reports a gap or duplicate the server did not announce as an `Anomaly` (should never
happen). Duplicates are not delivered. The TraderMade dialect (`/feedadv`) has no positions:
ticks are passed on unchecked and a reconnect does not resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

__all__ = [
    "Anomaly", "Client", "ClientError", "Error", "Event", "Forbidden", "InvalidData",
    "MessageTooBig", "PolicyViolation", "Positions", "Reset", "Revoked", "State", "Subscribed",
    "Tick", "Unauthorized",
]

Position = tuple[str, int]  # (epoch, seq)


@dataclass(slots=True, frozen=True)
class Tick:
    symbol: str
    bid: float
    ask: float
    mid: float
    ts: int
    epoch: str | None  # None on the TraderMade dialect
    seq: int | None
    snapshot: bool
    conflated: bool
    raw: bytes  # the frame exactly as received


@dataclass(slots=True, frozen=True)
class Reset:
    """The symbol's stream jumps: a `reset` (epoch set) or a resume with `recovered:false`."""
    symbol: str
    epoch: str | None
    reason: str


@dataclass(slots=True, frozen=True)
class Subscribed:
    symbols: tuple[str, ...]
    recovered: dict[str, bool]  # only for symbols resumed with `since`
    pending: tuple[str, ...] = ()  # called up on demand: no tick yet, the first one is on its way


@dataclass(slots=True, frozen=True)
class Error:
    code: str  # the server's error code, or "unsubscribed" when the server dropped symbols
    message: str
    symbols: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class State:
    state: Literal["connecting", "connected", "reconnecting", "closed"]
    url: str = ""
    delay: float = 0.0  # reconnecting: seconds before the next attempt
    reason: str = ""


@dataclass(slots=True, frozen=True)
class Anomaly:
    """A discontinuity the server did not announce: a bug somewhere, please report it."""
    symbol: str
    kind: Literal["gap", "duplicate", "epoch"]
    last: Position
    got: Position


Event = Tick | Reset | Subscribed | Error | State | Anomaly


class ClientError(Exception):
    """The client stopped: reconnecting would not help (see the close code table)."""
    code = 0

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Unauthorized(ClientError):
    code = 4001


class Revoked(ClientError):
    code = 4003


class PolicyViolation(ClientError):
    code = 1008


class MessageTooBig(ClientError):
    code = 1009


class InvalidData(ClientError):
    code = 1007


class Forbidden(ClientError):
    code = 403


_FATAL_CLOSE: dict[int, type[ClientError]] = {
    4001: Unauthorized, 4003: Revoked, 1008: PolicyViolation, 1009: MessageTooBig, 1007: InvalidData,
}
_FATAL_STATUS: dict[int, type[ClientError]] = {401: Unauthorized, 403: Forbidden}
_BACK_OFF = {1013, 4008}  # and HTTP statuses other than 401/403


@dataclass(slots=True)
class Positions:
    """Last position per symbol and whether the next tick may jump (announced); pure."""
    last: dict[str, Position] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)
    anomalies: int = 0

    def since(self, symbols: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {s: {"epoch": self.last[s][0], "seq": self.last[s][1]} for s in symbols if s in self.last}

    def announce(self, symbol: str) -> None:
        """A `reset` or `recovered:false`: the next tick starts afresh."""
        self.announced.add(symbol)

    def tick(self, symbol: str, epoch: str, seq: int, conflated: bool = False) -> tuple[bool, Anomaly | None]:
        """Judge a tick: (deliver it?, the anomaly if it is one)."""
        last = self.last.get(symbol)
        if last is None or symbol in self.announced:
            self.announced.discard(symbol)
            self.last[symbol] = (epoch, seq)
            return True, None
        anomaly: Anomaly | None = None
        if epoch != last[0]:
            anomaly = Anomaly(symbol, "epoch", last, (epoch, seq))
        elif seq <= last[1]:
            self.anomalies += 1
            return False, Anomaly(symbol, "duplicate", last, (epoch, seq))
        elif seq != last[1] + 1 and not conflated:
            anomaly = Anomaly(symbol, "gap", last, (epoch, seq))
        self.anomalies += anomaly is not None
        self.last[symbol] = (epoch, seq)
        return True, anomaly


class _Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code} {reason}".strip())
        self.code = code


class Client:
    """Follow `symbols` on one of `url` (a URL or a list tried in turn) with `key`."""

    def __init__(self, url: str | Sequence[str], key: str, symbols: Sequence[str], *,
                 auth: Literal["header", "frame"] = "header", backoff_initial: float = 0.1,
                 backoff_max: float = 10.0, open_timeout: float = 5.0) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("no URL")
        self.key = key
        self.symbols = list(dict.fromkeys(symbols))
        self.auth = auth
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.positions = Positions()
        self.reconnects = 0
        self._events: AsyncGenerator[Event, None] | None = None
        self._ws: ClientConnection | None = None

    async def __aenter__(self) -> Client:
        self._events = self._run()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._events is not None:
            await self._events.aclose()

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        if self._events is None:
            raise RuntimeError("use `async with Client(...) as client`")
        return await self._events.__anext__()

    @staticmethod
    def _tradermade(url: str) -> bool:
        return urlsplit(url).path.rstrip("/").endswith("/feedadv")

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff_initial * 2.0 ** attempt)) * random.uniform(0.5, 1.0)

    async def _run(self) -> AsyncGenerator[Event, None]:
        attempt, index = 0, 0
        while True:
            url = self.urls[index % len(self.urls)]
            yield State("connecting", url)
            at_once = False
            try:
                async with contextlib.aclosing(self._session(url)) as session:
                    async for event in session:
                        if isinstance(event, Subscribed | Tick):
                            attempt = 0  # a good session resets the backoff
                        yield event
                reason = "closed"
            except _Closed as exc:
                reason = str(exc)
                if exc.code in _FATAL_CLOSE:
                    yield State("closed", url, reason=reason)
                    raise _FATAL_CLOSE[exc.code](reason) from None
                at_once = exc.code == 1001
                if exc.code in _BACK_OFF:
                    attempt = max(attempt, 3)
            except InvalidStatus as exc:
                status = exc.response.status_code
                reason = f"HTTP {status}"
                if status in _FATAL_STATUS or (400 <= status < 500 and status != 429):
                    yield State("closed", url, reason=reason)
                    raise _FATAL_STATUS.get(status, ClientError)(f"{url}: {reason}", status) from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._ws = None
            delay = 0.0 if at_once else self._delay(attempt)
            attempt += not at_once
            index += 1
            self.reconnects += 1
            yield State("reconnecting", url, delay=delay, reason=reason)
            await asyncio.sleep(delay)

    async def _session(self, url: str) -> AsyncGenerator[Event, None]:
        tradermade = self._tradermade(url)
        headers = {"Authorization": f"Bearer {self.key}"} if self.auth == "header" and not tradermade else {}
        async with connect(url, additional_headers=headers, open_timeout=self.open_timeout,
                           close_timeout=1) as ws:
            self._ws = ws
            try:
                if tradermade:
                    await self._recv(ws)  # "Connected"
                    login = {"userKey": self.key, "symbol": ",".join(self.symbols)}
                    await ws.send(orjson.dumps(login).decode())
                else:
                    if self.auth == "frame":
                        await ws.send(orjson.dumps({"op": "auth", "key": self.key}).decode())
                        async with asyncio.timeout(self.open_timeout):
                            while orjson.loads(await self._recv(ws)).get("type") != "authenticated":
                                pass
                    for i in range(0, len(self.symbols), 100):
                        chunk = self.symbols[i:i + 100]
                        cmd: dict[str, Any] = {"op": "subscribe", "symbols": chunk}
                        if since := self.positions.since(chunk):
                            cmd["since"] = since
                        await ws.send(orjson.dumps(cmd).decode())
                yield State("connected", url)
                while True:
                    frame = await self._recv(ws)
                    for event in self.handle(frame):
                        yield event
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                raise _Closed(code, exc.rcvd.reason if exc.rcvd is not None else "") from None

    @staticmethod
    async def _recv(ws: ClientConnection) -> bytes:
        frame = await ws.recv(decode=False)
        return frame if isinstance(frame, bytes) else frame.encode()

    def handle(self, frame: bytes) -> list[Event]:
        """Turn one frame into events, updating positions (no I/O)."""
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError:  # TraderMade notices are plain text
            text = frame.decode(errors="replace")
            if text == "Invalid user key":
                raise Unauthorized(text) from None
            return [] if text == "Connected" else [Error("server", text)]
        if not isinstance(msg, dict):
            return []
        kind = msg.get("type", "tick" if "bid" in msg else None)
        if kind == "tick":
            epoch, seq = msg.get("epoch"), msg.get("seq")
            tick = Tick(msg["symbol"], msg["bid"], msg["ask"], msg.get("mid", (msg["bid"] + msg["ask"]) / 2),
                        int(msg["ts"]), epoch, seq, bool(msg.get("snapshot")), bool(msg.get("conflated")),
                        frame)
            if epoch is None or seq is None:
                return [tick]
            deliver, anomaly = self.positions.tick(tick.symbol, epoch, seq, tick.conflated)
            return [e for e in (anomaly, tick if deliver else None) if e is not None]
        if kind == "reset":
            self.positions.announce(msg["symbol"])
            return [Reset(msg["symbol"], msg.get("epoch"), msg.get("reason", ""))]
        if kind == "subscribed":
            recovered: dict[str, bool] = msg.get("recovered") or {}
            out: list[Event] = [Subscribed(tuple(msg.get("symbols", ())), recovered,
                                           tuple(msg.get("pending") or ()))]
            for symbol, ok in recovered.items():
                if not ok:
                    self.positions.announce(symbol)
                    out.append(Reset(symbol, None, "not recovered"))
            return out
        if kind in ("error", "unsubscribed"):
            symbols = tuple(msg.get("symbols") or ())
            # Not asked for again; `capacity` is: the vendor may have room after a reconnect.
            if kind == "unsubscribed" or msg.get("code") in ("forbidden_symbol", "unknown_symbol"):
                self.symbols = [s for s in self.symbols if s not in symbols]
            if kind == "unsubscribed":
                return [Error("unsubscribed", msg.get("reason", ""), symbols)] if msg.get("reason") else []
            return [Error(str(msg.get("code")), str(msg.get("message", "")), symbols)]
        return []
