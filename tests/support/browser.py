"""Headless Chromium from Debian's packages, driven over the Chrome DevTools Protocol.

    async with run_chromium() as browser:
        page = await browser.new_page()
        await page.navigate("http://127.0.0.1:8080/")
        value = await page.evaluate("document.title")
        png = await page.screenshot()

Chromium is found as /usr/bin/chromium (or `chromium` / `chromium-browser` on
PATH). When it is missing and we are root on Debian, Debian's `chromium`
package is installed with apt-get (`apt-get update` only if the first attempt
fails), like tests/support/nginx.py does for nginx. Otherwise RuntimeError: the
browser test needs it and must not silently skip. A browser that downloads
itself (Playwright, Puppeteer) is not used.

The browser runs with its own temporary profile on a free loopback
debugging port, in a session of its own; on exit exactly that process group is
ended and the profile removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .debian import find_or_install
from .ports import free_port

__all__ = ["Browser", "Page", "find_chromium", "run_chromium"]

_STARTUP_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_CDP_TIMEOUT = 15.0
_START_ATTEMPTS = 3


def find_chromium() -> str:
    """Return the path of a Chromium binary, installing Debian's `chromium` if need be."""
    places = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
    return find_or_install(["chromium", "chromium-browser"], places, ["chromium"], "the browser test")


class CdpError(RuntimeError):
    """The browser answered a DevTools command with an error."""


class _Cdp:
    """One DevTools WebSocket to the browser; commands routed by id, sessions by sessionId."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                fut = self._waiting.pop(msg.get("id", -1), None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(msg)
                elif "method" in msg and len(self.events) < 10_000:
                    self.events.append(msg)
        except ConnectionClosed:
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(CdpError("DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> Any:
        ident = next(self._ids)
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = fut
        await self._ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(fut, _CDP_TIMEOUT)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self._ws.close()


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, cdp: _Cdp, session: str) -> None:
        self._cdp = cdp
        self._session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self._cdp.send(method, params, self._session)

    async def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Open url and wait until its document has loaded (readyState complete)."""
        reply = await self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise CdpError(f"navigating to {url}: {reply['errorText']}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(CdpError):
                if await self.evaluate("document.readyState") == "complete":
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{url} did not finish loading within {timeout} s")

    async def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page (promises awaited); return its JSON value."""
        reply = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"JavaScript error: {text}")
        return reply["result"].get("value")

    async def screenshot(self) -> bytes:
        reply = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(reply["data"])


class Browser:
    def __init__(self, cdp: _Cdp) -> None:
        self._cdp = cdp

    async def new_page(self, width: int = 900, height: int = 520) -> Page:
        target = await self._cdp.send("Target.createTarget", {"url": "about:blank"})
        attached = await self._cdp.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self._cdp, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    @property
    def events(self) -> list[dict[str, Any]]:
        """DevTools events received so far (console messages, exceptions, ...)."""
        return self._cdp.events


def _version(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=1.0) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, ValueError):
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End exactly this browser: its own process group (started with a new session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_TIMEOUT)
    else:
        # The browser itself is gone; helpers of its group may linger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _start(chromium: str, profile: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start chromium on a free debugging port; return it and its browser DevTools URL."""
    problem = ""
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    "--remote-debugging-address=127.0.0.1",
                    f"--remote-debugging-port={port}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            info = _version(port)
            if info and info.get("webSocketDebuggerUrl"):
                return proc, str(info["webSocketDebuggerUrl"])
            time.sleep(0.1)
        exited = proc.poll()
        _stop(proc)
        problem = (
            f"exited with code {exited}"
            if exited is not None
            else f"did not answer on port {port} within {_STARTUP_TIMEOUT:.0f} s"
        )
    output = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise RuntimeError(f"chromium ({chromium}) {problem}.\n--- output ---\n{output}")


@contextlib.asynccontextmanager
async def run_chromium() -> AsyncIterator[Browser]:
    """Run headless Chromium with a temporary profile; yield a DevTools connection to it."""
    chromium = await asyncio.to_thread(find_chromium)
    tmp = Path(tempfile.mkdtemp(prefix="fxproxy-chromium-"))
    proc: subprocess.Popen[bytes] | None = None
    cdp: _Cdp | None = None
    try:
        (tmp / "profile").mkdir()
        proc, url = await asyncio.to_thread(_start, chromium, tmp / "profile", tmp / "chromium.log")
        ws = await connect(url, max_size=64 * 1024 * 1024, open_timeout=_CDP_TIMEOUT)
        cdp = _Cdp(ws)
        yield Browser(cdp)
    finally:
        if cdp is not None:
            await cdp.close()
        if proc is not None:
            await asyncio.to_thread(_stop, proc)
        shutil.rmtree(tmp, ignore_errors=True)
