"""Client protocol, sans I/O: frames in become commands, replies out become bytes.

Two dialects: the native JSON protocol on /v1/stream and the TraderMade one on /feedadv.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from shared.tick import is_epoch, is_symbol

Id = int | str | None


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_SYMBOL = "unknown_symbol"
    FORBIDDEN_SYMBOL = "forbidden_symbol"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"
    CAPACITY = "capacity"  # the upstream cannot take one more symbol now


class CloseCode:
    """Close codes we send, and whether the client should reconnect."""

    GOING_AWAY = 1001  # draining: reconnect (to another edge)
    POLICY = 1008  # repeated abuse: do not retry as is
    TOO_BIG = 1009  # frame over the size limit: fix the client
    TRY_AGAIN = 1013  # overloaded or too slow: reconnect with backoff
    UNAUTHORIZED = 4001  # no valid key in time: fix the key
    REVOKED = 4003  # key revoked or disabled: do not reconnect with it
    CONNECTION_LIMIT = 4008  # key's connection limit reached: close another first


@dataclass(slots=True, frozen=True)
class Since:
    """Where a resuming client stands; epoch None (a bare seq) means the current epoch."""

    epoch: str | None
    seq: int


@dataclass(slots=True, frozen=True)
class Subscribe:
    symbols: tuple[str, ...]
    id: Id = None
    since: dict[str, Since] = field(default_factory=dict)
    max_rate: float | None = None  # ticks a second per symbol, each the latest; None = all


@dataclass(slots=True, frozen=True)
class Unsubscribe:
    symbols: tuple[str, ...]
    id: Id = None


@dataclass(slots=True, frozen=True)
class Ping:
    id: Id = None


@dataclass(slots=True, frozen=True)
class Auth:
    key: str
    id: Id = None


@dataclass(slots=True, frozen=True)
class Login:
    """TraderMade login: the key and the whole set of symbols wanted."""

    key: str
    symbols: tuple[str, ...]


Command = Subscribe | Unsubscribe | Ping | Auth


class FrameError(Exception):
    """A client frame we refuse; the connection stays open and gets an error frame."""

    def __init__(self, code: ErrorCode, message: str, id: Id = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


def _bad(message: str, id: Id = None) -> FrameError:
    return FrameError(ErrorCode.BAD_REQUEST, message, id)


def _load_object(data: bytes | str) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _bad("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _bad("frame must be a JSON object")
    return obj


def _id(obj: dict[str, Any]) -> Id:
    value = obj.get("id")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    raise _bad("id must be an integer or a string of at most 64 characters")


def _symbols(raw: Any, id: Id, max_symbols: int) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise _bad("symbols must be a list of strings", id)
    if not raw:
        raise _bad("symbols must not be empty", id)
    if len(raw) > max_symbols:
        raise _bad(f"at most {max_symbols} symbols per request", id)
    bad = [s for s in raw if not is_symbol(s)]
    if bad:
        shown = ", ".join(repr(s)[:24] for s in bad[:5])
        raise _bad(f"malformed symbol(s): {shown}; symbols look like EURUSD or 9433@1", id)
    if len(set(raw)) != len(raw):
        raise _bad("duplicate symbols in request", id)
    return tuple(raw)


def _position(raw: Any) -> Since | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return Since(None, raw) if raw >= 0 else None
    if isinstance(raw, dict) and raw.keys() == {"epoch", "seq"}:
        epoch, seq = raw["epoch"], raw["seq"]
        if is_epoch(epoch) and isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            return Since(epoch, seq)
    return None


def _since(raw: Any, symbols: tuple[str, ...], id: Id) -> dict[str, Since]:
    if raw is None:
        return {}
    out = {k: _position(v) for k, v in raw.items()} if isinstance(raw, dict) else None
    if out is None or not all(k in symbols and v is not None for k, v in out.items()):
        raise _bad('since must map subscribed symbols to {"epoch": "...", "seq": N} '
                   "(or a bare seq for the current epoch)", id)
    return {k: v for k, v in out.items() if v is not None}


MAX_RATE = 1000.0


def _max_rate(obj: dict[str, Any], id: Id) -> float | None:
    rate = obj.get("max_rate")
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= MAX_RATE:
        raise _bad(f"max_rate must be a number of ticks a second, above 0 and at most {MAX_RATE:g}", id)
    return float(rate)


def parse_command(data: bytes | str, *, max_symbols: int) -> Command:
    """Parse one native text frame; raise FrameError with a precise reason."""
    obj = _load_object(data)
    id = _id(obj)
    op = obj.get("op")
    if op == "subscribe":
        symbols = _symbols(obj.get("symbols"), id, max_symbols)
        return Subscribe(symbols, id, _since(obj.get("since"), symbols, id), _max_rate(obj, id))
    if op == "unsubscribe":
        return Unsubscribe(_symbols(obj.get("symbols"), id, max_symbols), id)
    if op == "ping":
        return Ping(id)
    if op == "auth":
        key = obj.get("key")
        if not isinstance(key, str) or not key or len(key) > 256:
            raise _bad("auth needs a key string", id)
        return Auth(key, id)
    if op is None:
        raise _bad("missing op", id)
    raise _bad(f"unknown op {str(op)[:32]!r}", id)


def parse_login(data: bytes | str, *, max_symbols: int) -> Login:
    """Parse a TraderMade login frame {"userKey": "...", "symbol": "EURUSD,GBPUSD"}."""
    obj = _load_object(data)
    key = obj.get("userKey")
    if not isinstance(key, str) or not key or len(key) > 256:
        raise _bad("userKey must be a non-empty string")
    raw = obj.get("symbol")
    if not isinstance(raw, str):
        raise _bad("symbol must be a comma-separated string")
    return Login(key, _symbols([s.strip() for s in raw.split(",") if s.strip()], None, max_symbols))


# Replies. Built here so every dialect's wording lives in one place.


def _reply(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def subscribed(id: Id, symbols: list[str], recovered: dict[str, bool] | None = None,
               max_rate: dict[str, float] | None = None, pending: list[str] | None = None) -> bytes:
    out: dict[str, Any] = {"type": "subscribed", "id": id, "symbols": symbols}
    if recovered:
        out["recovered"] = recovered
    if max_rate:
        out["max_rate"] = max_rate  # what was granted, per throttled symbol
    if pending:
        out["pending"] = pending  # not streamed yet: the first tick comes when the vendor sends it
    return _reply(out)


def reset(symbol: str, epoch: str, reason: str) -> bytes:
    """The stream of `symbol` jumps: a new epoch, or a gap history could not fill."""
    return _reply({"type": "reset", "symbol": symbol, "epoch": epoch, "reason": reason})


def unsubscribed(id: Id, symbols: list[str], reason: str | None = None) -> bytes:
    out: dict[str, Any] = {"type": "unsubscribed", "id": id, "symbols": symbols}
    if reason:
        out["reason"] = reason
    return _reply(out)


def pong(id: Id) -> bytes:
    return _reply({"type": "pong", "id": id})


def authenticated(id: Id, name: str) -> bytes:
    return _reply({"type": "authenticated", "id": id, "key": name})


def error(code: ErrorCode, message: str, id: Id = None, symbols: list[str] | None = None) -> bytes:
    out: dict[str, Any] = {"type": "error", "id": id, "code": code.value, "message": message}
    if symbols:
        out["symbols"] = symbols
    return _reply(out)


def tm_error(message: str) -> bytes:
    """TraderMade answers problems with plain text, not JSON."""
    return message.encode()


# WebSocket framing for the hot path: the header is built once per message.

_OP_TEXT = 0x81  # FIN + text


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked server text frame (no extensions negotiated, so it is the same for all)."""
    n = len(payload)
    if n < 126:
        return bytes((_OP_TEXT, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _OP_TEXT, 126, n) + payload
    return struct.pack("!BBQ", _OP_TEXT, 127, n) + payload


def frame_payload(frame: bytes) -> bytes:
    """The payload of a frame made by text_frame."""
    n = frame[1]
    return frame[2 + (n == 126) * 2 + (n == 127) * 8 :]
