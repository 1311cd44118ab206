"""The tick model and its wire encodings (native frame, TraderMade dialect)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

SYMBOL_RE = re.compile(r"[A-Z][A-Z0-9]{2,15}")


def is_symbol(value: object) -> bool:
    return isinstance(value, str) and SYMBOL_RE.fullmatch(value) is not None


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
    seq: int

    @classmethod
    def from_quote(cls, quote: Quote, seq: int) -> Tick:
        return cls(quote.symbol, quote.bid, quote.ask, quote.mid, quote.ts, seq)


def encode_tick(tick: Tick) -> bytes:
    """Encode a tick as the native client frame; `seq` is last so edges can read it cheaply."""
    return orjson.dumps(
        {
            "type": "tick",
            "symbol": tick.symbol,
            "bid": tick.bid,
            "ask": tick.ask,
            "mid": tick.mid,
            "ts": tick.ts,
            "seq": tick.seq,
        }
    )


def decode_tick(payload: bytes) -> Tick:
    """Decode a native tick frame; raises ValueError on anything else."""
    try:
        d = orjson.loads(payload)
        return Tick(d["symbol"], d["bid"], d["ask"], d["mid"], d["ts"], d["seq"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a tick payload: {exc}") from exc


def seq_of(payload: bytes) -> int:
    """Read `seq` from an encoded tick without decoding the JSON (hot path)."""
    i = payload.rfind(b'"seq":')
    if i < 0:
        raise ValueError("payload has no seq")
    i += 6
    j = i
    n = len(payload)
    while j < n and 48 <= payload[j] <= 57:
        j += 1
    return int(payload[i:j])


def mark_snapshot(payload: bytes) -> bytes:
    """Turn an encoded tick into its snapshot form by appending one field."""
    return payload[:-1] + b',"snapshot":true}'


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
