"""Handshake decisions, sans I/O: client address behind proxies, origin, plain HTTP replies."""

from __future__ import annotations

import email.utils
import http
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

from shared.metrics import render_metrics

Network = IPv4Network | IPv6Network


def parse_networks(cidrs: list[str]) -> list[Network]:
    return [ip_network(c, strict=False) for c in cidrs]


def _trusted(ip: str, trusted: list[Network]) -> bool:
    try:
        addr = ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def client_ip(peer_ip: str, headers: Headers, trusted: list[Network]) -> str:
    """The client's address: believe forwarding headers only from a trusted proxy."""
    if not _trusted(peer_ip, trusted):
        return peer_ip
    forwarded = [p.strip() for p in ",".join(headers.get_all("X-Forwarded-For")).split(",")]
    # Walk right to left past our own proxies; the first other hop is the client.
    for hop in reversed([p for p in forwarded if p]):
        if not _trusted(hop, trusted):
            return hop
    real = headers.get("X-Real-IP")
    return real.strip() if real else peer_ip


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    # Non-browser clients send no Origin; the list guards against cross-site browser use.
    return not allowed or origin is None or origin in allowed


def http_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  extra: list[tuple[str, str]] | None = None) -> Response:
    code = http.HTTPStatus(status)
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        *(extra or []),
    ])
    return Response(code.value, code.phrase, headers, body)


# The browser page (edge/static): a fixed allow-list of URL path -> (file, content type),
# read once at import. Nothing else on disk is ever served, so no path can traverse.
_STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/client.js": ("client.js", "text/javascript; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
_STATIC_HEADERS = [
    ("Cache-Control", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    # Same-origin scripts, styles and WebSocket only; the page is never framed.
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
     "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]


def _load_static() -> dict[str, tuple[bytes, str]]:
    loaded: dict[str, tuple[bytes, str]] = {}
    for url_path, (name, ctype) in _STATIC_FILES.items():
        try:
            loaded[url_path] = ((_STATIC_DIR / name).read_bytes(), ctype)
        except OSError:
            continue  # a trimmed install without the page: those paths are 404
    return loaded


_STATIC = _load_static()


def endpoint_response(path: str, ready: Callable[[], bool],
                      metrics: Callable[[], tuple[bytes, str]] = render_metrics) -> Response:
    """The plain HTTP endpoints beside the WebSocket ones: /healthz, /readyz, /metrics,
    and the browser page (/, /client.js, /app.js, /app.css)."""
    static = _STATIC.get(path)
    if static is not None:
        body, ctype = static
        return http_response(200, body, ctype, _STATIC_HEADERS)
    if path == "/healthz":
        return http_response(200, b"ok\n")
    if path == "/readyz":
        ok = ready()
        return http_response(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
    if path == "/metrics":
        body, ctype = metrics()
        return http_response(200, body, ctype)
    return http_response(404, b"not found\n")
