"""Echo server around the edge's real connection code, for Autobahn TestSuite.

Everything but the message handler is the edge as shipped: EdgeApp, EdgeServer, Connection
(sans-I/O websockets parser, bounded read slices, frame budget, Writer, close handling), on uvloop.
`_on_message` echoes instead of running commands (the base class has checked text is UTF-8,
fragment by fragment). No key is needed: the echo never looks at the session.

    python bench/autobahn/echo_edge.py [PORT]   # prints "LISTENING <port>" once bound
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop
from websockets.frames import Frame, Opcode

from edge.app import EdgeApp
from edge.connection import Connection
from edge.server import EdgeServer
from shared.memory_bus import MemoryBus
from shared.settings import EdgeSettings


class EchoConnection(Connection):
    def _on_message(self, data: bytes, binary: bool) -> None:
        assert self.writer is not None
        opcode = Opcode.BINARY if binary else Opcode.TEXT
        self.writer.send(Frame(opcode, data).serialize(mask=False))


class EchoEdgeServer(EdgeServer):
    def protocol_factory(self) -> Connection:
        return EchoConnection(self)


def settings(port: int) -> EdgeSettings:
    # ping_interval: keepalive pings tick every 10 s by default; Autobahn 0.8.2 writes its pong
    # between the chops of a half-sent frame (cases 6.4.3/6.4.4), corrupting the stream it sends
    # (1002 instead of 1007). No real client can do that, so keep keepalive out of the run.
    return EdgeSettings(
        host="127.0.0.1", port=port, api_keys=["x"], max_frame_size=16 * 1024 * 1024,
        op_rate=1e9, op_burst=10**9, max_strikes=10**9, handshake_rate=1e6, handshake_burst=10**6,
        auth_timeout=3600, write_buffer=64 * 1024 * 1024, max_lag=3600, slow_client_timeout=3600,
        ping_interval=3600,
    )


async def main(port: int) -> None:
    s = settings(port)
    app = EdgeApp(s, MemoryBus(), None)
    app.server = EchoEdgeServer(s, app.server.bus, app.server.auth)  # same bus and authenticator
    bound = await app.start()
    print(f"LISTENING {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop(drain_timeout=0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
