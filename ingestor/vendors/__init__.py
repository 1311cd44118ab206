"""Upstream vendors: one module per dialect (sans-I/O part and session driver), chosen by
FXPROXY_UPSTREAM_DIALECT. `open_session` is all the pool knows of them."""

from __future__ import annotations

from collections.abc import Collection

from ingestor.backoff import Backoff
from ingestor.vendors.base import SILENT, Hooks, Status, VendorError, VendorSession

# Both drivers load with the process, not when a standby takes over: importing aiohttp costs a
# quarter of a second, which would add to every failover.
from ingestor.vendors.kabu import KabuSession
from ingestor.vendors.tradermade import TraderMadeSession
from shared.settings import IngestorSettings
from shared.tick import is_symbol

__all__ = ["SILENT", "Hooks", "Status", "VendorError", "VendorSession", "carries", "open_session"]


def carries(settings: IngestorSettings, symbol: str) -> bool:
    """Whether the dialect can name `symbol` at all (kabu: code@exchange; tradermade: no @)."""
    return is_symbol(symbol) and ("@" in symbol) == (settings.upstream_dialect == "kabu")


def open_session(settings: IngestorSettings, slot: int, symbols: Collection[str],
                 hooks: Hooks) -> VendorSession:
    """Session number `slot` of the pool, for `symbols` (not started: the pool runs it)."""
    key = settings.upstream_key.get_secret_value()
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    if settings.upstream_dialect == "kabu":
        # A new token revokes the old one: each session is a kabuステーション of its own.
        return KabuSession(settings.upstream_urls[slot], key, symbols, hooks,
                           silence_timeout=settings.silence_timeout, backoff=backoff, label=str(slot))
    return TraderMadeSession(settings.upstream_urls, key, symbols, hooks,
                             headers=settings.upstream_headers, silence_timeout=settings.silence_timeout,
                             backoff=backoff, label=str(slot))
