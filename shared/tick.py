"""The tick model and its wire encodings (native frame, TraderMade dialect).

A tick's position in its symbol's stream is (epoch, seq): seq grows by exactly one within
an epoch, and a new epoch (seq from 1 again) starts only when no state could continue it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import NamedTuple

import orjson

# Forex and crypto pairs (EURUSD, XAUUSD), or an exchange-listed code with its market after an @,
# as kabuステーション names them (9433@1: KDDI on the Tokyo Stock Exchange).
SYMBOL_RE = re.compile(r"[A-Z][A-Z0-9]{2,15}|[0-9A-Z]{3,20}@[0-9]{1,2}")
EPOCH_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def is_symbol(value: object) -> bool:
    return isinstance(value, str) and SYMBOL_RE.fullmatch(value) is not None


def is_epoch(value: object) -> bool:
    return isinstance(value, str) and EPOCH_RE.fullmatch(value) is not None


def new_epoch() -> str:
    """A fresh epoch: 48 random bits, so one is never reused, even across Redis data loss."""
    return secrets.token_urlsafe(6)


class Position(NamedTuple):
    epoch: str
    seq: int


@dataclass(slots=True, frozen=True)
class Quote:
    """A price as the vendor sent it, before the ingestor numbers it."""

    symbol: str
    bid: float
    ask: float
    mid: float
    ts: int  # vendor timestamp, ms since the epoch


@dataclass(slots=True, frozen=True)
class Tick:
    symbol: str
    bid: float
    ask: float
    mid: float
    ts: int
    epoch: str
    seq: int

    @classmethod
    def from_quote(cls, quote: Quote, epoch: str, seq: int) -> Tick:
        return cls(quote.symbol, quote.bid, quote.ask, quote.mid, quote.ts, epoch, seq)


def encode_tick(tick: Tick) -> bytes:
    """Encode a tick as the native client frame; epoch and seq are last so edges read them cheaply."""
    return orjson.dumps(
        {
            "type": "tick",
            "symbol": tick.symbol,
            "bid": tick.bid,
            "ask": tick.ask,
            "mid": tick.mid,
            "ts": tick.ts,
            "epoch": tick.epoch,
            "seq": tick.seq,
        }
    )


def decode_tick(payload: bytes) -> Tick:
    """Decode a native tick frame; raises ValueError on anything else."""
    try:
        d = orjson.loads(payload)
        return Tick(d["symbol"], d["bid"], d["ask"], d["mid"], d["ts"], d["epoch"], d["seq"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a tick payload: {exc}") from exc


def position_of(payload: bytes) -> Position:
    """Read (epoch, seq) from an encoded tick without decoding the JSON (hot path)."""
    i = payload.rfind(b'"seq":')
    if i < 0:
        raise ValueError("payload has no seq")
    e = payload.rfind(b'"epoch":"', 0, i)
    if e < 0:
        raise ValueError("payload has no epoch")
    epoch_end = payload.find(b'"', e + 9, i)
    i += 6
    j = i
    n = len(payload)
    while j < n and 48 <= payload[j] <= 57:
        j += 1
    if j == i or epoch_end < 0:
        raise ValueError("payload has a malformed position")
    return Position(payload[e + 9 : epoch_end].decode(), int(payload[i:j]))


def mark(payload: bytes, field: bytes) -> bytes:
    """Append `"field":true` to an encoded tick (snapshot, conflated): one copy, no JSON parse."""
    return payload[:-1] + b',"' + field + b'":true}'


def mark_snapshot(payload: bytes) -> bytes:
    return mark(payload, b"snapshot")


def to_tradermade(payload: bytes) -> bytes:
    """Re-encode a native tick in the TraderMade streaming shape (ts as a string)."""
    d = orjson.loads(payload)
    return orjson.dumps(
        {
            "symbol": d["symbol"],
            "ts": str(d["ts"]),
            "bid": d["bid"],
            "ask": d["ask"],
            "mid": d["mid"],
        }
    )
