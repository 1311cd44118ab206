"""How far behind a client reads, sans I/O: a numbered ping it can answer only after reading
everything sent before it (pongs follow the data they trail)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

_PROBE = struct.Struct("!4sQ")  # ping payload: tag, sequence number
_TAG = b"lag?"


@dataclass(slots=True)
class LagProbe:
    seq: int = 0
    sent: float | None = None  # when the ping now in flight left; None when none is

    def start(self, now: float) -> bytes:
        """A new probe: the ping payload to send."""
        self.seq += 1
        self.sent = now
        return _PROBE.pack(_TAG, self.seq)

    def overdue(self, now: float, max_lag: float) -> bool:
        return self.sent is not None and now - self.sent > max_lag

    def answered(self, pong: bytes, now: float) -> float | None:
        """The lag this pong measures, if it answers the probe in flight."""
        if self.sent is None or len(pong) != _PROBE.size or _PROBE.unpack(pong) != (_TAG, self.seq):
            return None
        lag, self.sent = now - self.sent, None
        return lag
