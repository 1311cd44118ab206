"""`fxproxy edge --workers 2` against the session's real redis-server, through the CLI.

Which worker serves a client is read from outside, in /proc: the worker process that
holds the server end of the client's TCP connection (tests/support/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from edge.workers import HUNG_AFTER
from edge.workgroup import STALE_BEAT
from tests.conftest import API_KEY, Cluster
from tests.integration.test_keys_cluster import create_key
from tests.support.client import closed_code, live_ticks, open_native, recv_json, send_json
from tests.support.procs import Proc, metric, wait_http
from tests.support.workers import alive, children, raw_upgrade, serving_pid, wait_children

pytestmark = pytest.mark.integration


def readyz(port: int, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # nothing accepted the connection


def state_dir(proc: Proc) -> Path:
    """The run directory the supervisor logged at its start."""
    for line in proc.log.splitlines():
        if line.startswith("{") and "edge supervisor starting" in line:
            return Path(orjson.loads(line)["state_dir"])
    raise AssertionError("no supervisor start in the log")


def two_workers(cluster: Cluster, **env: str) -> tuple[Proc, int, set[int]]:
    proc, port = cluster.edge(FXPROXY_WORKERS="2", **env)
    return proc, port, wait_children(proc.proc.pid, 2)


async def connect_many(port: int, n: int, pids: set[int], key: str = API_KEY,
                       on_every_worker: bool = False) -> list[tuple[ClientConnection, int]]:
    """`n` clients, each with the pid of the worker that took it; with `on_every_worker`,
    more (up to 4 n) until each worker has one."""
    out: list[tuple[ClientConnection, int]] = []
    while len(out) < n or (on_every_worker and {p for _, p in out} != pids and len(out) < 4 * n):
        ws = await open_native(port, key)
        out.append((ws, serving_pid(port, ws.local_address[1], pids)))
    return out


async def pong(ws: ClientConnection) -> bool:
    await send_json(ws, {"op": "ping", "id": 7})
    return (await recv_json(ws)) == {"type": "pong", "id": 7}


async def test_two_workers_serve_ticks_from_both_and_metrics_add_them_up(cluster: Cluster) -> None:
    cluster.simfeed()
    cluster.ingestor()
    _, port, pids = two_workers(cluster)
    clients = await connect_many(port, 24, pids)
    spread = Counter(pid for _, pid in clients)
    print(f"{len(clients)} connections per worker pid: {dict(spread)}")
    assert set(spread) == pids, "SO_REUSEPORT gave every connection to one worker"
    assert min(spread.values()) >= 3  # the kernel hashes connections evenly: P(fail) < 1e-4
    for ws, _ in clients:  # each worker ticks from its own bus subscription
        await send_json(ws, {"op": "subscribe", "symbols": ["EURUSD"]})
    for ws, _ in clients:
        ticks = await live_ticks(ws, 2)
        assert [t["symbol"] for t in ticks] == ["EURUSD", "EURUSD"]
    # Any worker may take a scrape; each must answer for both.
    totals = {metric(port, "fxproxy_edge_connections") for _ in range(10)}
    assert totals == {float(len(clients))}, totals
    assert metric(port, "fxproxy_edge_bus_connected") == 1.0
    assert metric(port, "fxproxy_edge_bus_symbols") == 2.0  # EURUSD on each worker's subscriber
    for ws, _ in clients[:10]:
        await ws.close()
    await asyncio.sleep(0.3)
    assert metric(port, "fxproxy_edge_connections") == len(clients) - 10
    for ws, _ in clients[10:]:
        await ws.close()


async def test_a_killed_worker_is_restarted_and_its_clients_are_served_again(cluster: Cluster) -> None:
    proc, port, pids = two_workers(cluster)
    clients = await connect_many(port, 16, pids)
    victim = next(pid for _, pid in clients)
    dropped = [ws for ws, pid in clients if pid == victim]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    seen: list[int] = []
    while not (503 in seen and seen[-1] == 200):  # down, then every worker ready again
        seen.append(readyz(port))
        assert time.monotonic() - killed_at < 10, f"no recovery; /readyz said {Counter(seen)}"
        await asyncio.sleep(0.02)
    restart_s = time.monotonic() - killed_at
    new_pids = await asyncio.to_thread(wait_children, proc.proc.pid, 2, 5.0, {victim})
    print(f"worker restarted, /readyz 200 again {restart_s:.2f} s after kill -9")
    assert restart_s < 5.0
    assert len(new_pids - pids) == 1 and not alive(victim)
    assert [await closed_code(ws, 3) for ws in dropped] == [1006] * len(dropped)
    again = await connect_many(port, 2 * len(dropped), new_pids)
    assert all([await pong(ws) for ws, _ in again])
    assert all([await pong(ws) for ws, pid in clients if pid != victim])
    assert metric(port, "fxproxy_edge_worker_restarts_total") == 1.0
    assert metric(port, "fxproxy_edge_connections") == len(clients) - len(dropped) + len(again)


@pytest.mark.slow  # waits out HUNG_AFTER (10 s)
async def test_a_hung_worker_turns_readyz_503_and_is_killed_and_replaced(cluster: Cluster) -> None:
    proc, port, pids = two_workers(cluster)
    clients = await connect_many(port, 8, pids, on_every_worker=True)
    victim = next(pid for _, pid in clients)
    os.kill(victim, signal.SIGSTOP)  # its event loop stops: no beat, no accept, no answer
    stopped_at = time.monotonic()
    first_503 = 0.0
    try:
        while alive(victim):
            status = await asyncio.to_thread(readyz, port, 0.3)  # 0: the stuck worker took it
            if status == 503 and not first_503:
                first_503 = time.monotonic() - stopped_at
            assert time.monotonic() - stopped_at < HUNG_AFTER + 5, "the hung worker was never killed"
            await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    killed_s = time.monotonic() - stopped_at
    new_pids = await asyncio.to_thread(wait_children, proc.proc.pid, 2, 5.0, {victim})
    await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", 10)
    print(f"hung worker: /readyz 503 after {first_503:.2f} s, killed after {killed_s:.2f} s")
    assert 0 < first_503 < STALE_BEAT + 2.5
    assert HUNG_AFTER <= killed_s < HUNG_AFTER + 3
    again = await connect_many(port, 4, new_pids, on_every_worker=True)
    assert all([await pong(ws) for ws, _ in again])
    assert all([await pong(ws) for ws, pid in clients if pid != victim])


async def test_sigterm_drains_every_worker_with_1001_and_leaves_no_process(cluster: Cluster) -> None:
    proc, port, pids = two_workers(cluster, FXPROXY_DRAIN_TIMEOUT="1")
    clients = await connect_many(port, 12, pids, on_every_worker=True)
    assert {pid for _, pid in clients} == pids
    run_dir = state_dir(proc)
    assert run_dir.is_dir()
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    codes = [await closed_code(ws) for ws, _ in clients]
    code = await asyncio.to_thread(proc.proc.wait, 20)
    took = time.monotonic() - started
    print(f"drained {len(clients)} clients over 2 workers and exited in {took:.2f} s (drain timeout 1 s)")
    assert codes == [1001] * len(clients)
    assert code == 0
    assert took < 1 + 5
    assert not any(alive(pid) for pid in pids) and children(proc.proc.pid) == set()
    assert not run_dir.exists()


async def test_readyz_is_503_while_one_worker_drains(cluster: Cluster) -> None:
    proc, port, pids = two_workers(cluster, FXPROXY_DRAIN_TIMEOUT="2")
    clients = await connect_many(port, 8, pids)
    draining = next(pid for _, pid in clients)
    os.kill(draining, signal.SIGTERM)  # that worker alone: it drains and exits, then is restarted
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < 1.5:
        statuses.append(readyz(port))
        await asyncio.sleep(0.05)
    codes = [await closed_code(ws, 3) for ws, pid in clients if pid == draining]
    print(f"/readyz during one worker's drain: {Counter(statuses)}")
    assert 503 in statuses, "never 503 while a worker drained"
    since = statuses[statuses.index(503):]
    assert since == [503] * len(since) and len(since) >= 3  # the other worker answers for both
    assert codes == [1001] * len(codes)
    await asyncio.to_thread(wait_children, proc.proc.pid, 2, 10.0, {draining})
    deadline = time.monotonic() + 10
    while readyz(port) != 200:
        assert time.monotonic() < deadline, "never ready again after the drained worker restarted"
        await asyncio.sleep(0.05)


async def test_a_keys_connection_limit_is_exact_whichever_worker_takes_the_connection(
    cluster: Cluster,
) -> None:
    key = create_key(cluster.redis_url, "wendy", "--max-connections", "3")
    _, port, pids = two_workers(cluster)
    held = await connect_many(port, 3, pids, key)
    refused_by: Counter[int] = Counter()
    for _ in range(40):  # until both workers have refused a 4th connection
        pid, status = await asyncio.to_thread(raw_upgrade, port, key, pids)
        assert status == 429, f"worker {pid} let a 4th connection in"
        refused_by[pid] += 1
        if len(refused_by) == 2 and min(refused_by.values()) >= 2:
            break
    print(f"3 held on {Counter(pid for _, pid in held)}; 4th refused by {dict(refused_by)}")
    assert set(refused_by) == pids
    await held[0][0].close()
    deadline = time.monotonic() + 3
    while True:  # the freed slot is taken again, on either worker (the release is async)
        try:
            ws = await open_native(port, key)
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "a closed connection's slot was never released"
            await asyncio.sleep(0.05)
    assert await pong(ws)
    pid, status = await asyncio.to_thread(raw_upgrade, port, key, pids)
    assert status == 429
    await ws.close()
    for other, _ in held[1:]:
        await other.close()


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(cluster: Cluster) -> None:
    proc, port, pids = two_workers(cluster, FXPROXY_DRAIN_TIMEOUT="1")
    clients = await connect_many(port, 6, pids, on_every_worker=True)
    run_dir = state_dir(proc)
    killed_at = time.monotonic()
    proc.kill()  # SIGKILL: no drain by the supervisor; PR_SET_PDEATHSIG tells the workers
    codes = [await closed_code(ws) for ws, _ in clients]
    while any(alive(pid) for pid in pids):
        assert time.monotonic() - killed_at < 10, "workers outlived their supervisor"
        await asyncio.sleep(0.05)
    took = time.monotonic() - killed_at
    print(f"workers gone {took:.2f} s after kill -9 of the supervisor (drain timeout 1 s)")
    assert codes == [1001] * len(clients)
    assert took < 1 + 5
    assert not run_dir.exists(), "the last worker out did not remove the run directory"


async def test_a_killed_workers_slots_are_freed_as_soon_as_it_is_replaced(cluster: Cluster) -> None:
    key = create_key(cluster.redis_url, "vera", "--max-connections", "4")
    proc, port, pids = two_workers(cluster, FXPROXY_HEARTBEAT_INTERVAL="5")  # slots expire in 15 s
    held = await connect_many(port, 4, pids, key)
    victim = held[0][1]
    lost = sum(pid == victim for _, pid in held)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(wait_children, proc.proc.pid, 2, 5.0, {victim})
    again = []
    while len(again) < lost:  # the dropped clients come back with the same key
        try:
            again.append(await open_native(port, key))
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            assert time.monotonic() - killed_at < 10, "the dead worker's slots were never freed"
            await asyncio.sleep(0.05)
    took = time.monotonic() - killed_at
    print(f"{lost} slots of a killed worker free again {took:.2f} s after kill -9 (expiry: 15 s)")
    assert took < 5.0
    pid, status = await asyncio.to_thread(raw_upgrade, port, key, children(proc.proc.pid))
    assert status == 429, "a 5th connection got in: slots were freed twice"
    for ws in again:
        await ws.close()
    for ws, pid in held:
        if pid != victim:
            await ws.close()


async def test_a_second_multi_worker_edge_on_a_taken_port_is_refused_not_merged(cluster: Cluster) -> None:
    # With SO_REUSEPORT alone, a second group would join the first and take half its clients.
    proc, port, pids = two_workers(cluster)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")}
    env.update(FXPROXY_REDIS_URL=cluster.redis_url, FXPROXY_API_KEYS=API_KEY)
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "fxproxy", "edge", "--workers", "2", "--host", "127.0.0.1",
                         "--port", str(port)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"fxproxy edge: OSError: [Errno 98] cannot listen on 127.0.0.1:{port}: address already in use"]
    clients = await connect_many(port, 8, pids)  # serving_pid fails on a pid outside the group
    assert {pid for _, pid in clients} <= pids and children(proc.proc.pid) == pids
    for ws, _ in clients:
        await ws.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_edge_that_cannot_listen_exits_1_with_one_clear_line(redis_url: str, workers: str) -> None:
    with socket.socket() as taken:  # a plain listener: SO_REUSEPORT cannot share its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FXPROXY_")}
        env.update(FXPROXY_REDIS_URL=redis_url, FXPROXY_API_KEYS=API_KEY, FXPROXY_LOG_FORMAT="json")
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "fxproxy", "edge", "--workers", workers, "--host",
                              "127.0.0.1", "--port", str(port)], env=env, capture_output=True,
                             text=True, timeout=60)
        took = time.monotonic() - started
    plain = [line for line in out.stderr.splitlines() if line.startswith("fxproxy edge: ")]
    print(f"edge --workers {workers} on a taken port exited {out.returncode} after {took:.2f} s")
    assert out.returncode == 1 and took < 10
    assert plain and "address already in use" in plain[0]
    assert "edge worker restarted" not in out.stderr
