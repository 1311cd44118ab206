"""Prometheus exposition and a minimal health/metrics HTTP endpoint for non-edge processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


def render_metrics() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def serve_health(host: str, port: int, is_ready: Callable[[], bool]) -> asyncio.Server:
    """Serve GET /healthz, /readyz and /metrics; one request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = line.split()
            path = parts[1].decode(errors="replace") if len(parts) > 1 else ""
            if path == "/healthz":
                writer.write(_response("200 OK", b"ok\n"))
            elif path == "/readyz":
                ok = is_ready()
                writer.write(_response("200 OK" if ok else "503 Service Unavailable",
                                       b"ready\n" if ok else b"not ready\n"))
            elif path == "/metrics":
                body, ctype = render_metrics()
                writer.write(_response("200 OK", body, ctype))
            else:
                writer.write(_response("404 Not Found", b"not found\n"))
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
