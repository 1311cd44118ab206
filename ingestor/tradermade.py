"""The TraderMade streaming dialect, sans I/O: login frame and tick parsing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson

from shared.tick import Quote, is_symbol

GREETING = "Connected"


class MalformedMessage(ValueError):
    pass


def login_frame(user_key: str, symbols: Sequence[str]) -> str:
    return orjson.dumps({"userKey": user_key, "symbol": ",".join(symbols)}).decode()


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
