"""Upstream vendors: one module per dialect (sans-I/O part and session driver), chosen by
FXPROXY_UPSTREAM_DIALECT. `open_session` is all the pool knows of them."""

from __future__ import annotations

from collections.abc import Collection

from ingestor.backoff import Backoff
from ingestor.vendors.base import Hooks, Status, VendorError, VendorSession
from shared.settings import IngestorSettings

__all__ = ["Hooks", "Status", "VendorError", "VendorSession", "carries", "open_session"]


def carries(settings: IngestorSettings, symbol: str) -> bool:
    """Whether the dialect can name `symbol` at all (kabu: code@exchange; tradermade: no @)."""
    from ingestor.vendors.kabu import is_kabu_symbol

    return is_kabu_symbol(symbol) == (settings.upstream_dialect == "kabu")


def open_session(settings: IngestorSettings, slot: int, symbols: Collection[str],
                 hooks: Hooks) -> VendorSession:
    """Session number `slot` of the pool, for `symbols` (not started: the pool runs it)."""
    key = settings.upstream_key.get_secret_value()
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    if settings.upstream_dialect == "kabu":
        from ingestor.vendors.kabu import KabuSession

        # A new token revokes the old one: each session is a kabuステーション of its own.
        return KabuSession(settings.upstream_urls[slot], key, symbols, hooks,
                           silence_timeout=settings.silence_timeout, backoff=backoff, label=str(slot))
    from ingestor.vendors.tradermade import TraderMadeSession

    return TraderMadeSession(settings.upstream_urls, key, symbols, hooks,
                             headers=settings.upstream_headers, silence_timeout=settings.silence_timeout,
                             backoff=backoff, label=str(slot))
