"""Upgrading a connection: the checks in order (origin, rate, drain, capacity, key, slot)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from websockets.datastructures import MultipleValuesError
from websockets.http11 import Request

from edge.auth import key_from_request
from edge.handshake import client_ip, origin_allowed

if TYPE_CHECKING:
    from edge.connection import Connection
    from edge.server import EdgeServer

log = logging.getLogger("fxproxy.edge")


async def upgrade(server: EdgeServer, conn: Connection, request: Request) -> None:
    """Accept or refuse the upgrade; never leaves the client hanging, whatever fails."""
    try:
        await _decide(server, conn, request)
    except MultipleValuesError as exc:
        if not conn.lost:
            conn.reject(400, "bad_header", f"duplicate header: {exc}")
    except Exception:
        log.exception("handshake failed", extra={"ip": conn.peer_ip})
        if not conn.lost and not conn.upgraded:
            conn.reject(500, "internal", "internal error")
    finally:
        conn.upgrade_done()


async def _decide(server: EdgeServer, conn: Connection, request: Request) -> None:
    s = server.settings
    # Duplicated security headers raise MultipleValuesError here: 400, see upgrade().
    if not origin_allowed(request.headers.get("Origin"), s.allowed_origins):
        return conn.reject(403, "origin", "origin not allowed")
    conn.peer_ip = client_ip(conn.peer_ip, request.headers, server.trusted)
    if not server.handshakes.take(conn.peer_ip, asyncio.get_running_loop().time()):
        return conn.reject(429, "rate_limited", "too many handshakes from your address")
    if server.draining:
        return conn.reject(503, "draining", "server draining, connect to another edge")
    if server.open_count >= s.max_connections:
        return conn.reject(503, "full", "server at its connection limit, try again later")
    identity = None
    key = key_from_request(request.path, request.headers)
    if key is not None:
        try:
            identity = await server.auth.authenticate(key)
            admitted = identity is not None and await server.take_slot(conn, identity)
        except (RedisError, OSError):
            return conn.reject(503, "auth_unavailable", "key store unavailable, try again")
        if conn.lost:
            return None
        if identity is None:
            log.info("bad API key at handshake", extra={"ip": conn.peer_ip})
            return conn.reject(401, "unauthorized", "invalid API key")
        if not admitted:
            return conn.reject(429, "key_limit", "connection limit reached for this key")
    if not conn.accept(request):
        server.give_back_slot(conn)
        return None
    if identity is not None:
        conn.commands.authenticated(identity)
    else:
        conn.arm_auth_timer(s.auth_timeout)
    return None
