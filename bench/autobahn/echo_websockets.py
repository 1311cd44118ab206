"""Baseline echo server: plain websockets (asyncio implementation), no compression, 16 MiB messages.

    python bench/autobahn/echo_websockets.py [PORT]   # prints "LISTENING <port>" once bound
"""

from __future__ import annotations

import asyncio
import signal
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def main(port: int) -> None:
    async with serve(echo, "127.0.0.1", port, max_size=16 * 1024 * 1024, compression=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"LISTENING {bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
