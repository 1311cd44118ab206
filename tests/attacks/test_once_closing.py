"""Once the edge has sent a close, the connection does nothing more than finish it.

Issue 8: an auth frame that arrived after the 4001 close still ran; if valid, the connection
stayed "closing" forever and streamed ticks on /feedadv, and keepalive skipped it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import API_KEY, Cluster
from tests.support.attackers import OP_CLOSE, OP_TEXT, connect_ws, drain, masked_frame, text
from tests.support.procs import metric

from .measure import edge_errors, neighbour

pytestmark = pytest.mark.integration

AUTH_TIMEOUT = 0.5
PING_INTERVAL = 1.0
CLOSE_TIMEOUT = 2.0  # edge/connection.py: a client's time to answer our close before the edge's FIN
FIN_BOUND = CLOSE_TIMEOUT + 1.0  # s from the close frame to the end of the TCP stream
GONE_BOUND = CLOSE_TIMEOUT + 2 * PING_INTERVAL + 1.5  # s until the edge has dropped it entirely
LOGIN = text({"userKey": API_KEY, "symbol": "EURUSD,GBPUSD"})


def _garbage() -> bytes:
    return masked_frame(OP_TEXT, b"not json")


@pytest.mark.parametrize("how", ["after-4001", "behind-10th-strike"])
async def test_valid_login_after_the_edge_sent_close_gets_no_tick_and_is_dropped(
    cluster: Cluster, how: str,
) -> None:
    cluster.simfeed(rate=50)
    cluster.ingestor()
    proc, port = cluster.edge(FXPROXY_AUTH_TIMEOUT=str(AUTH_TIMEOUT),
                              FXPROXY_PING_INTERVAL=str(PING_INTERVAL))
    async with neighbour(port, cluster.redis_url) as good:
        client = await asyncio.to_thread(connect_ws, port, "/feedadv")
        try:
            if how == "after-4001":
                # Wait (reading) for the auth timeout's close, then log in at once, validly.
                await asyncio.to_thread(drain, client, AUTH_TIMEOUT + 2, True)
                expected = 4001
            else:
                # Ten bad frames earn a 1008; a valid login rides in the same segment behind them.
                client.send(b"".join(_garbage() for _ in range(10)) + LOGIN)
                await asyncio.to_thread(drain, client, 2.0, True)
                expected = 1008
            assert client.received.close_code == expected, client.received.close_code
            closed_at = client.received.close_at
            assert closed_at is not None
            client.send(LOGIN)
            received = await asyncio.to_thread(drain, client, FIN_BOUND + 2)
            fin_after = None if received.eof_at is None else received.eof_at - closed_at
            # The client never answers the close nor closes its end: the edge must drop it anyway.
            for _ in range(int((GONE_BOUND + 2) / 0.1)):
                if metric(port, "fxproxy_edge_connections") <= 1:
                    break
                await asyncio.sleep(0.1)
            gone_after = time.monotonic() - closed_at
        finally:
            client.close()
        texts = [p for op, p, _ in received.frames if op == OP_TEXT]
        after_close = [(op, p) for op, p, at in received.frames if at > closed_at]
        print(f"\n{how}: close {received.close_code}, then {len(after_close)} frame(s); TCP end "
              f"{fin_after if fin_after is None else round(fin_after, 2)} s after the close (bound "
              f"{FIN_BOUND} s); the edge counted it gone {gone_after:.2f} s after (bound {GONE_BOUND} s)")
        assert not [p for p in texts if b'"bid"' in p], "a tick was sent after the close"
        assert all(op == OP_CLOSE for op, _ in after_close), after_close
        assert fin_after is not None and fin_after < FIN_BOUND
        assert gone_after < GONE_BOUND
        assert metric(port, "fxproxy_edge_connections") == 1
        good.assert_contiguous()
    assert not edge_errors(proc.log)
