"""What one authenticated client may do: entitlements, limits, strikes. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.ratelimit import TokenBucket
from shared.keystore import KeyRecord


@dataclass(slots=True)
class SubscribePlan:
    allowed: list[str]
    forbidden: list[str]
    over_limit: list[str]
    already: list[str]


@dataclass(slots=True)
class Session:
    max_subscriptions: int
    max_strikes: int
    bucket: TokenBucket
    key_hash: str = ""
    record: KeyRecord | None = None
    symbols: set[str] = field(default_factory=set)
    strikes: int = 0
    asked_rate: dict[str, float | None] = field(default_factory=dict)  # max_rate per symbol asked

    @property
    def authenticated(self) -> bool:
        return self.record is not None

    @property
    def key_name(self) -> str:
        return self.record.name if self.record else "-"

    def allow_frame(self, now: float) -> bool:
        return self.bucket.take(now)

    def strike(self) -> bool:
        """Count a rejected frame; True once the client has earned a 1008 close."""
        self.strikes += 1
        return self.strikes >= self.max_strikes

    def plan_subscribe(self, symbols: tuple[str, ...]) -> SubscribePlan:
        assert self.record is not None
        plan = SubscribePlan([], [], [], [])
        room = self.max_subscriptions - len(self.symbols)
        for symbol in symbols:
            if symbol in self.symbols:
                plan.already.append(symbol)
            elif not self.record.allows(symbol):
                plan.forbidden.append(symbol)
            elif room <= 0:
                plan.over_limit.append(symbol)
            else:
                plan.allowed.append(symbol)
                room -= 1
        return plan

    def granted_rate(self, asked: float | None) -> float | None:
        """The max rate a subscription gets: what it asked, bounded by the key's cap."""
        cap = self.record.max_rate if self.record is not None and self.record.max_rate > 0 else None
        if asked is None or cap is None:
            return asked if cap is None else cap
        return min(asked, cap)

    def disallowed(self, record: KeyRecord) -> list[str]:
        """Symbols held now that an updated record no longer allows."""
        return sorted(s for s in self.symbols if not record.allows(s))
