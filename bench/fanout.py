"""Fan-out benchmark runner: one command, every process started and stopped here.

For each server under test (``edge`` by default; ``--compare`` = edge, naive,
broadcast, node):

1. start a private ``redis-server`` on a free loopback port;
2. start the server pinned to ``--cpu`` (``taskset``), wait until its port accepts;
3. sample its RSS, start ``loadclient`` (C, epoll) on the other core(s), wait until
   every client is connected and subscribed (``ready`` event on its stderr);
4. start ``publisher.py`` (also off the server's core) at ``--rate`` msg/s;
5. sample the server's CPU time and RSS when the loadclient's measured window starts
   and ends (after ``--warmup``), then collect the loadclient's JSON result;
6. stop everything (also on Ctrl-C or an error).

Usage::

    .venv/bin/python bench/fanout.py [--clients 1000] [--rate 100] [--symbols 10]
        [--duration 20] [--warmup 5] [--slow-fraction 0] [--write-delay-ms 0]
        [--compare | --servers edge,naive,broadcast,node] [--repeat 1] [--cpu 1] [--json]
        [--workers N | --workers-compare 1,2]

Every client subscribes to every symbol, so the offered load is
``rate x connected normal clients`` deliveries per second.

``--workers N`` runs the edge as ``fxproxy edge --workers N`` (a supervisor and N forked
workers, all pinned to ``--cpu`` as one edge is); ``--workers-compare 1,2`` runs it once per
count, side by side. The edge's CPU is then summed over all its processes, and each worker's
own CPU per delivery is shown too (its clients' share of the deliveries).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"
LOG_DIR = BUILD_DIR / "logs"
LOADCLIENT_SRC = BENCH_DIR / "loadclient.c"
LOADCLIENT_BIN = BUILD_DIR / "loadclient"
NODE_DIR = BENCH_DIR / "node"
PYTHON = sys.executable
API_KEY = "benchkey"
HOST = "127.0.0.1"
ALL_SERVERS = ("edge", "naive", "broadcast", "node")

MAJORS = [
    "EURUSD",
    "GBPUSD",
    "USDJPY",
    "AUDUSD",
    "USDCAD",
    "USDCHF",
    "NZDUSD",
    "EURGBP",
    "EURJPY",
    "GBPJPY",
]
CURRENCIES = [
    "EUR",
    "USD",
    "GBP",
    "JPY",
    "AUD",
    "CAD",
    "CHF",
    "NZD",
    "SEK",
    "NOK",
    "DKK",
    "SGD",
    "HKD",
    "MXN",
]


def _all_symbols() -> list[str]:
    out = list(MAJORS)
    for a, b in itertools.permutations(CURRENCIES, 2):
        if a + b not in out:
            out.append(a + b)
    return out


ALL_SYMBOLS = _all_symbols()


def symbol_list(n: int) -> list[str]:
    """``n`` distinct six-letter FX symbols: the majors first, then other crosses."""
    return ALL_SYMBOLS[:n]


# --------------------------------------------------------------------------------------
# Servers under test. The edge command lives here, in one place: adjust when the CLI
# of `fxproxy edge` changes.
# --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    port: int
    redis_url: str
    symbols: list[str]
    args: argparse.Namespace


@dataclass
class ServerSpec:
    name: str
    argv: Callable[[Ctx], list[str]]
    env: Callable[[Ctx], dict[str, str]]
    available: Callable[[], str | None]
    """Returns None when runnable, else the reason to skip."""
    metrics_prefix: str | None = None
    """Prometheus metric-name prefix scraped from GET /metrics at the window's end."""
    loadclient_args: tuple[str, ...] = ()
    """Extra load-client arguments (e.g. --max-rate: the same server, throttled clients)."""
    workers: int = 1
    """Edge worker processes (FXPROXY_WORKERS): CPU is summed over the process tree."""


def edge_argv(ctx: Ctx) -> list[str]:
    if importlib.util.find_spec("fxproxy.__main__") is not None:
        return [PYTHON, "-m", "fxproxy", "edge", "--port", str(ctx.port)]
    # no fxproxy/__main__.py: call the console-script entry point directly
    main = "import sys; from fxproxy.cli import main; sys.exit(main())"
    return [PYTHON, "-c", main, "edge", "--port", str(ctx.port)]


def edge_env(ctx: Ctx) -> dict[str, str]:
    n = ctx.args.clients
    env = {
        "FXPROXY_REDIS_URL": ctx.redis_url,
        "FXPROXY_API_KEYS": API_KEY,
        "FXPROXY_LOG_LEVEL": "warning",
        "FXPROXY_HOST": HOST,
        # every benchmark client comes from 127.0.0.1: lift the per-IP handshake limit
        "FXPROXY_HANDSHAKE_RATE": str(max(1000.0, 2 * ctx.args.connect_rate)),
        "FXPROXY_HANDSHAKE_BURST": str(max(1000, n)),
        "FXPROXY_MAX_CONNECTIONS": str(max(10000, n + 100)),
        "FXPROXY_MAX_SUBSCRIPTIONS": str(max(200, len(ctx.symbols))),
        "FXPROXY_MAX_SYMBOLS_PER_REQUEST": str(max(100, len(ctx.symbols))),
    }
    if ctx.args.write_delay_ms:
        env["FXPROXY_WRITE_DELAY"] = str(ctx.args.write_delay_ms / 1000.0)
    if ctx.args.workers != 1:
        env["FXPROXY_WORKERS"] = str(ctx.args.workers)
    for item in ctx.args.edge_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def edge_with_workers(n: int) -> ServerSpec:
    """The edge as `fxproxy edge --workers n`."""

    def env(ctx: Ctx) -> dict[str, str]:
        return {**edge_env(ctx), "FXPROXY_WORKERS": str(n)}

    return ServerSpec(f"edge-w{n}", edge_argv, env, edge_available, "fxproxy_edge_", workers=n)


def edge_available() -> str | None:
    try:
        if importlib.util.find_spec("fxproxy.__main__") or importlib.util.find_spec("fxproxy.cli"):
            return None
    except ImportError as exc:
        return f"package fxproxy is not importable by {PYTHON}: {exc}"
    return f"neither fxproxy.__main__ nor fxproxy.cli is importable by {PYTHON}"


def server_args(ctx: Ctx) -> list[str]:
    """Flags every baseline server takes."""
    return ["--host", HOST, "--port", str(ctx.port), "--redis-url", ctx.redis_url, "--key", API_KEY]


def naive_argv(mode: str) -> Callable[[Ctx], list[str]]:
    def argv(ctx: Ctx) -> list[str]:
        return [PYTHON, str(BENCH_DIR / "naive_server.py"), "--mode", mode, *server_args(ctx)]

    return argv


def no_env(ctx: Ctx) -> dict[str, str]:
    return {}


def always() -> str | None:
    return None


def node_argv(ctx: Ctx) -> list[str]:
    return [shutil.which("node") or "node", str(NODE_DIR / "server.js"), *server_args(ctx)]


_node_state: dict[str, str | None] = {}


def node_available() -> str | None:
    """Install the node deps once (npm install) if node and npm exist."""
    if "reason" in _node_state:
        return _node_state["reason"]
    reason: str | None = None
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        reason = "node/npm not found on PATH"
    elif (
        not (NODE_DIR / "node_modules" / "ws").is_dir()
        or not (NODE_DIR / "node_modules" / "ioredis").is_dir()
    ):
        progress("installing node dependencies (npm install) ...")
        try:
            proc = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if proc.returncode != 0:
                reason = f"npm install failed: {proc.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            reason = "npm install timed out"
    _node_state["reason"] = reason
    return reason


def baseline_edge(ref: str) -> ServerSpec:
    """The edge as it was at git `ref` (a worktree under bench/.build), to compare a change with
    its own past in the same run: same publisher, same load client, same cores."""
    tree = BUILD_DIR / f"edge-{ref}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", str(tree), ref],
                       check=True, capture_output=True)
    # Import that tree's packages, not the editable install's (a meta path finder) of this one.
    main = (f"import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'ditable' not in "
            f"repr(f)]; sys.path.insert(0, {str(tree)!r}); from fxproxy.cli import main; sys.exit(main())")

    def argv(ctx: Ctx) -> list[str]:
        return [PYTHON, "-c", main, "edge", "--port", str(ctx.port)]

    return ServerSpec(f"edge@{ref}", argv, edge_env, edge_available, "fxproxy_edge_")


SERVERS: dict[str, ServerSpec] = {
    "edge": ServerSpec("edge", edge_argv, edge_env, edge_available, "fxproxy_edge_"),
    "naive": ServerSpec("naive", naive_argv("naive"), no_env, always),
    "broadcast": ServerSpec("broadcast", naive_argv("broadcast"), no_env, always),
    "node": ServerSpec("node", node_argv, no_env, node_available),
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def progress(msg: str) -> None:
    print(f"[fanout] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not accept connections within {timeout:.0f}s")


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until GET /readyz answers 200 (a multi-core edge: every worker ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"/readyz on port {port} did not answer 200 within {timeout:.0f}s")


def redis_ping(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer PING within {timeout:.0f}s")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, kernel_only: bool = False) -> float | None:
    """utime + stime of a process (all its threads), in seconds; stime alone if kernel_only."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data.rsplit(")", 1)[1].split()
    return (int(rest[12]) + (0 if kernel_only else int(rest[11]))) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (an edge's supervisor and workers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def tree_sum(values: list[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def established(pid: int, port: int) -> int:
    """TCP connections process `pid` holds whose local port is `port` (a worker's clients)."""
    inodes: set[str] = set()
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    n = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
    return n


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_cpus(spec: str | None) -> list[int]:
    """'1' / '0,2' / '2-3' -> [cpu, ...]"""
    out: list[int] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if "-" in part:
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def core_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat (busy includes irq/softirq)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + nums[4]
            out[int(name[3:])] = (sum(nums) - idle, sum(nums))
    return out


def core_busy(start: Sample, end: Sample, cores: list[int]) -> float | None:
    """Average busy % of ``cores`` between two samples."""
    busy = total = 0
    for c in cores:
        if c in start.cores and c in end.cores:
            busy += end.cores[c][0] - start.cores[c][0]
            total += end.cores[c][1] - start.cores[c][1]
    return round(100 * busy / total, 1) if total > 0 else None


def cpus_available() -> set[int]:
    return set(os.sched_getaffinity(0))


def pin(cpus: str | None) -> list[str]:
    if not cpus or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cpus]


def build_loadclient() -> Path:
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    if LOADCLIENT_BIN.exists() and LOADCLIENT_BIN.stat().st_mtime >= LOADCLIENT_SRC.stat().st_mtime:
        return LOADCLIENT_BIN
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise SystemExit("no C compiler (gcc) found: cannot build bench/loadclient.c")
    progress(f"compiling {LOADCLIENT_SRC.name} -> {LOADCLIENT_BIN.relative_to(REPO_DIR)}")
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(LOADCLIENT_BIN), str(LOADCLIENT_SRC)],
        check=True,
        timeout=120,
    )
    return LOADCLIENT_BIN


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Procs:
    """Every process this runner starts; stopped in reverse order by pid."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            argv, env=full_env, cwd=REPO_DIR, start_new_session=True, stdin=subprocess.DEVNULL, **kw
        )
        self.items.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)

    def stop_all(self) -> None:
        for _, proc in reversed(self.items):
            self.stop(proc)
        self.items.clear()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    server_cpu: float | None
    server_sys: float | None
    server_rss: int | None
    client_cpu: float | None
    redis_cpu: float | None
    publisher_cpu: float | None
    cores: dict[int, tuple[int, int]]
    worker_cpu: dict[int, float] = field(default_factory=dict)
    """CPU seconds per worker pid (children of an edge supervisor)."""
    worker_clients: dict[int, int] = field(default_factory=dict)


@dataclass
class RunResult:
    server: str
    run: int
    ok: bool
    error: str | None = None
    client: dict[str, Any] = field(default_factory=dict)
    publisher: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    server_metrics: dict[str, float] = field(default_factory=dict)


def read_events(stream: Any, on_event: Callable[[dict[str, Any]], None], other: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("{"):
            try:
                on_event(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        other.append(line)


def scrape_metrics(port: int, prefix: str) -> dict[str, float]:
    """The server's own Prometheus counters/gauges named ``prefix*`` (``_created`` left out)."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=3) as resp:
            text = resp.read().decode(errors="replace")
    except OSError as exc:
        progress(f"could not scrape /metrics: {exc}")
        return out
    for line in text.splitlines():
        if not line.startswith(prefix) or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def seed_symbols(redis_url: str, symbols: list[str]) -> None:
    """Store a snapshot per symbol in fx:last before the server starts (the edge only
    accepts symbols it knows from there)."""
    argv = [PYTHON, str(BENCH_DIR / "publisher.py"), "--redis-url", redis_url]
    argv += ["--symbols", ",".join(symbols), "--seed-only"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"seeding fx:last failed: {proc.stderr.strip()[-500:]}")


def run_one(spec: ServerSpec, run_no: int, args: argparse.Namespace, loadclient: Path) -> RunResult:
    procs = Procs()
    res = RunResult(server=spec.name, run=run_no, ok=False)
    symbols = symbol_list(args.symbols)
    server_cpus = args.cpu
    others = sorted(cpus_available() - set(parse_cpus(args.cpu))) if args.cpu else []
    other_cpus = ",".join(str(c) for c in others) or None
    if args.cpu and not other_cpus:
        progress("warning: no CPU left for the load generator; not pinning it")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    tag = f"{spec.name}-{run_no}"
    server_log = LOG_DIR / f"{tag}.server.log"
    try:
        # 1. redis
        rport = free_port()
        redis_argv = [
            "redis-server",
            "--port",
            str(rport),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        with open(LOG_DIR / f"{tag}.redis.log", "wb") as redis_log:
            redis_proc = procs.start(
                "redis", [*pin(other_cpus), *redis_argv], stdout=redis_log, stderr=subprocess.STDOUT
            )
        redis_ping(rport, 10)
        redis_url = f"redis://{HOST}:{rport}/0"
        seed_symbols(redis_url, symbols)

        # 2. server
        port = free_port()
        ctx = Ctx(port=port, redis_url=redis_url, symbols=symbols, args=args)
        with open(server_log, "wb") as slog:
            server = procs.start(
                spec.name,
                [*pin(server_cpus), *spec.argv(ctx)],
                env=spec.env(ctx),
                stdout=slog,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_port(port, server, args.start_timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {server_log} ---\n{tail(server_log)}") from None
        if spec.workers > 1:  # every worker listening and subscribed, not just the first
            wait_ready(port, server, args.start_timeout)
        time.sleep(1.0)
        rss_before = tree_sum([rss_kb(p) for p in process_tree(server.pid)])

        # 3. load client
        samples: dict[str, Sample] = {}
        events: queue.Queue[str] = queue.Queue()
        lc_other: list[str] = []
        pids: dict[str, int] = {}

        def sample(name: str) -> None:
            tree = process_tree(server.pid)
            workers = [p for p in tree if p != server.pid] if spec.workers > 1 else []
            samples[name] = Sample(
                t=time.monotonic(),
                server_cpu=tree_sum([cpu_seconds(p) for p in tree]),
                server_sys=tree_sum([cpu_seconds(p, kernel_only=True) for p in tree]),
                server_rss=int(r) if (r := tree_sum([rss_kb(p) for p in tree])) is not None else None,
                client_cpu=cpu_seconds(pids["loadclient"]) if "loadclient" in pids else None,
                redis_cpu=cpu_seconds(redis_proc.pid),
                publisher_cpu=cpu_seconds(pids["publisher"]) if "publisher" in pids else None,
                cores=core_times(),
                worker_cpu={p: c for p in workers if (c := cpu_seconds(p)) is not None},
                worker_clients={p: established(p, port) for p in workers},
            )

        def on_event(ev: dict[str, Any]) -> None:
            name = str(ev.get("event"))
            if name in ("ready", "traffic", "window_start", "window_end"):
                sample(name)
                if name == "ready":
                    res.metrics["ready"] = ev
            events.put(name)

        connect_timeout = args.clients / args.connect_rate + 60
        lc_argv = [
            *pin(other_cpus),
            str(loadclient),
            "--host", HOST,
            "--port", str(port),
            "--path", f"/v1/stream?api_key={API_KEY}",
            "--clients", str(args.clients),
            "--symbols", ",".join(symbols),
            "--duration", str(args.duration),
            "--warmup", str(args.warmup),
            "--slow-fraction", str(args.slow_fraction),
            "--connect-rate", str(args.connect_rate),
            "--connect-timeout", str(connect_timeout),
            "--start-timeout", "15",
            "--linger", "1",
            *spec.loadclient_args,
        ]  # fmt: skip
        lc = procs.start("loadclient", lc_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pids["loadclient"] = lc.pid
        reader = threading.Thread(target=read_events, args=(lc.stderr, on_event, lc_other), daemon=True)
        reader.start()

        def wait_event(name: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"loadclient: no '{name}' event within {timeout:.0f}s")
                try:
                    if events.get(timeout=min(left, 0.5)) == name:
                        return
                except queue.Empty:
                    if lc.poll() is not None:
                        raise RuntimeError(
                            f"loadclient exited ({lc.returncode}) before '{name}': "
                            + " | ".join(lc_other[-5:])
                        ) from None
                    if server.poll() is not None:
                        raise RuntimeError(
                            f"server exited ({server.returncode})\n--- {server_log} ---\n{tail(server_log)}"
                        ) from None

        wait_event("ready", connect_timeout + 10)
        ready = res.metrics.get("ready", {})
        progress(
            f"{tag}: {ready.get('connected')}/{args.clients} connected "
            f"in {ready.get('connect_s')}s ({ready.get('handshake_failures')} failures); "
            f"publishing {args.rate:g} msg/s"
        )

        # 4. publisher (runs a little longer than the loadclient's window)
        pub_argv = [
            *pin(other_cpus),
            PYTHON,
            str(BENCH_DIR / "publisher.py"),
            "--redis-url", redis_url,
            "--symbols", ",".join(symbols),
            "--rate", str(args.rate),
            "--duration", str(args.warmup + args.duration + 20),
        ]  # fmt: skip
        with open(LOG_DIR / f"{tag}.publisher.log", "wb") as plog:
            pub = procs.start("publisher", pub_argv, stdout=subprocess.PIPE, stderr=plog)
        pids["publisher"] = pub.pid

        # 5. measured window
        wait_event("window_start", 15 + args.warmup + 15)
        wait_event("window_end", args.duration + 15)
        if spec.metrics_prefix:
            res.server_metrics = scrape_metrics(port, spec.metrics_prefix)
        try:
            out, _ = lc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise RuntimeError("loadclient did not exit after its window") from None
        reader.join(timeout=2)
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if lc.returncode != 0 or not lines:
            raise RuntimeError(f"loadclient failed ({lc.returncode}): " + " | ".join(lc_other[-5:]))
        res.client = json.loads(lines[-1])

        procs.stop(pub, timeout=10)
        if pub.stdout is not None:
            pub_lines = [
                ln for ln in pub.stdout.read().decode(errors="replace").splitlines() if ln.startswith("{")
            ]
            if pub_lines:
                res.publisher = json.loads(pub_lines[-1])
        server_alive = server.poll() is None
        res.metrics.update(
            compute_metrics(res.client, samples, rss_before, args, parse_cpus(server_cpus), others)
        )
        res.metrics["server_alive_at_end"] = server_alive
        res.warnings = run_warnings(res, args, lc_other)
        for w in res.warnings:
            progress(f"{tag}: warning: {w}")
        if lc_other and args.verbose:
            progress(f"{tag}: loadclient said: " + " | ".join(lc_other[-10:]))
        res.ok = True
    except Exception as exc:  # reported per row; the other servers still run
        res.error = str(exc)
        progress(f"{tag}: FAILED: {exc}")
    finally:
        procs.stop_all()
    return res


def run_warnings(res: RunResult, args: argparse.Namespace, lc_stderr: list[str]) -> list[str]:
    """Things that make a row's numbers suspect."""
    out: list[str] = []
    c, m = res.client, res.metrics
    if c.get("handshake_failures"):
        out.append(f"{c['handshake_failures']} handshake failures")
    if c.get("subscribe_errors"):
        first = next((ln for ln in lc_stderr if "subscribe error" in ln), "")
        out.append(f"{c['subscribe_errors']} subscribe errors {first[-200:]}")
    if not c.get("received"):
        out.append("no tick received in the measured window")
    elif m.get("deliveries_per_s", 0) < 0.97 * m.get("offered_per_s", 0):
        out.append("deliveries below the offered load: the server is saturated or dropping")
    if not m.get("server_alive_at_end", True):
        out.append("the server exited during the run")
    pub_rate = res.publisher.get("rate")
    if pub_rate is not None and pub_rate < 0.98 * args.rate:
        out.append(f"publisher reached only {pub_rate} msg/s")
    busy = m.get("loadgen_core_busy_pct")
    if busy is not None and busy > 90:
        out.append(f"load-generator core(s) {busy:.0f}% busy: the client side may be the limit")
    return out


def compute_metrics(
    client: dict[str, Any],
    samples: dict[str, Sample],
    rss_before: int | None,
    args: argparse.Namespace,
    server_cores: list[int],
    other_cores: list[int],
) -> dict[str, Any]:
    m: dict[str, Any] = {}
    start, end = samples.get("window_start"), samples.get("window_end")
    received = int(client.get("received", 0))
    window = float(client.get("duration_s") or 0.0)
    normal = int(client.get("connected", 0)) - int(client.get("slow", 0))
    m["deliveries_per_s"] = received / window if window > 0 else 0.0
    m["offered_per_s"] = args.rate * max(0, normal)
    if start and end and start.server_cpu is not None and end.server_cpu is not None:
        cpu = end.server_cpu - start.server_cpu
        wall = end.t - start.t
        m["server_cpu_s"] = round(cpu, 3)
        m["server_cpu_pct"] = round(100 * cpu / wall, 1) if wall > 0 else None
        m["cpu_us_per_delivery"] = round(cpu * 1e6 / received, 3) if received else None
        if start.server_sys is not None and end.server_sys is not None and received:
            m["sys_us_per_delivery"] = round((end.server_sys - start.server_sys) * 1e6 / received, 3)
        if start.client_cpu is not None and end.client_cpu is not None and wall > 0:
            m["client_cpu_pct"] = round(100 * (end.client_cpu - start.client_cpu) / wall, 1)
        if start.redis_cpu is not None and end.redis_cpu is not None and wall > 0:
            m["redis_cpu_pct"] = round(100 * (end.redis_cpu - start.redis_cpu) / wall, 1)
        if start.publisher_cpu is not None and end.publisher_cpu is not None and wall > 0:
            m["publisher_cpu_pct"] = round(100 * (end.publisher_cpu - start.publisher_cpu) / wall, 1)
        m["server_core_busy_pct"] = core_busy(start, end, server_cores)
        m["loadgen_core_busy_pct"] = core_busy(start, end, other_cores)
        m["rss_start_kb"] = start.server_rss
        m["rss_end_kb"] = end.server_rss
        m["cpu_us_per_delivery_per_worker"] = m["cpu_us_per_delivery"]
        if end.worker_cpu and received and wall > 0:
            m.update(per_worker(start, end, received, wall))
    ready = samples.get("ready")
    connected = int(client.get("connected", 0))
    m["rss_before_kb"] = rss_before
    m["rss_ready_kb"] = ready.server_rss if ready else None
    if rss_before is not None and start and start.server_rss is not None and connected:
        m["rss_kb_per_conn"] = round((start.server_rss - rss_before) / connected, 2)
    lat = client.get("lat_us", {})
    for k in ("p50", "p90", "p99", "max"):
        m[f"lat_{k}_ms"] = round(lat.get(k, 0) / 1000.0, 3)
    m["disconnects"] = client.get("disconnects", 0)
    m["seq_gaps"] = client.get("seq_gaps", 0)
    drain = client.get("slow_drain") or {}
    m["slow_closed"] = drain.get("closed", 0) + client.get("slow_disconnects", 0)
    m["slow_close_codes"] = drain.get("close_codes", {})
    return m


def per_worker(start: Sample, end: Sample, received: int, wall: float) -> dict[str, Any]:
    """Each worker's CPU per delivery: its CPU in the window over its clients' share of the
    deliveries (every client gets every symbol, so deliveries follow the client count)."""
    clients = sum(end.worker_clients.values())
    rows = []
    for pid in sorted(end.worker_cpu):
        if pid not in start.worker_cpu:
            continue  # restarted in the window
        cpu = end.worker_cpu[pid] - start.worker_cpu[pid]
        n = end.worker_clients.get(pid, 0)
        share = received * n / clients if clients else 0
        rows.append({
            "pid": pid, "clients": n, "cpu_pct": round(100 * cpu / wall, 1),
            "cpu_us_per_delivery": round(cpu * 1e6 / share, 3) if share else None,
        })
    figures = [r["cpu_us_per_delivery"] for r in rows if r["cpu_us_per_delivery"] is not None]
    return {
        "workers": rows,
        "cpu_us_per_delivery_per_worker": round(statistics.mean(figures), 3) if figures else None,
    }


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------

COLUMNS: list[tuple[str, str, str]] = [
    # header, metric key, format
    ("deliv/s", "deliveries_per_s", "{:,.0f}"),
    ("offered/s", "offered_per_s", "{:,.0f}"),
    ("CPU µs/deliv", "cpu_us_per_delivery", "{:.2f}"),
    ("of it kernel", "sys_us_per_delivery", "{:.2f}"),
    ("srv CPU%", "server_cpu_pct", "{:.0f}"),
    ("p50 ms", "lat_p50_ms", "{:.2f}"),
    ("p99 ms", "lat_p99_ms", "{:.2f}"),
    ("max ms", "lat_max_ms", "{:.1f}"),
    ("RSS KB/conn", "rss_kb_per_conn", "{:.1f}"),
    ("disc", "disconnects", "{:d}"),
    ("seq gaps", "seq_gaps", "{:d}"),
    ("client CPU%", "client_cpu_pct", "{:.0f}"),
    ("loadgen core%", "loadgen_core_busy_pct", "{:.0f}"),
]


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


WORKER_COLUMNS: list[tuple[str, str, str]] = [
    ("µs/deliv/worker", "cpu_us_per_delivery_per_worker", "{:.2f}"),
]

SLOW_COLUMNS: list[tuple[str, str, str]] = [
    ("slow closed", "slow_closed", "{:d}"),
    ("slow codes", "slow_close_codes", "{}"),
]


def print_table(rows: list[tuple[str, dict[str, Any]]], title: str, slow: bool = False,
                workers: bool = False) -> None:
    cols = COLUMNS[:3] + WORKER_COLUMNS + COLUMNS[3:] if workers else COLUMNS
    cols = cols + SLOW_COLUMNS if slow else cols
    headers = ["server", *(c[0] for c in cols)]
    body = [[name, *(fmt(m.get(key), f) for _, key, f in cols)] for name, m in rows]
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
    print(title)
    print(
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    for r in body:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    print()


def median_metrics(results: list[RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = {
        k
        for r in results
        for k, v in r.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for k in sorted(keys):
        vals = [r.metrics[k] for r in results if isinstance(r.metrics.get(k), int | float)]
        if vals:
            med = statistics.median(vals)
            out[k] = int(med) if all(isinstance(v, int) for v in vals) and float(med).is_integer() else med
    return out


def ratios(summary: dict[str, dict[str, Any]], base: str) -> dict[str, float]:
    """base CPU per delivery divided by each other server's (below 1 = base is cheaper)."""
    out: dict[str, float] = {}
    b = summary.get(base, {}).get("cpu_us_per_delivery")
    if not b:
        return out
    for name, m in summary.items():
        v = m.get("cpu_us_per_delivery")
        if name != base and v:
            out[name] = round(b / v, 3)
    return out


def describe(args: argparse.Namespace) -> str:
    text = (
        f"{args.clients} clients x {args.symbols} symbols, {args.rate:g} msg/s published, "
        f"window {args.duration:g}s after {args.warmup:g}s warmup, "
        f"slow fraction {args.slow_fraction:g}, server on CPU {args.cpu or '-'}"
    )
    if args.write_delay_ms:
        text += f", edge write delay {args.write_delay_ms:g} ms"
    if args.workers_compare:
        text += f", edge workers {args.workers_compare} (all on the server CPU)"
    elif args.workers > 1:
        text += f", edge workers {args.workers} (all on the server CPU)"
    return text


def iter_runs(servers: list[str], repeat: int) -> Iterator[tuple[int, str]]:
    for r in range(1, repeat + 1):  # alternate: a b c, a b c, ...
        for s in servers:
            yield r, s


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="WebSocket connections (default 1000)")
    p.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="published ticks per second, all symbols (default 100)",
    )
    p.add_argument(
        "--symbols", type=int, default=10, help="number of symbols; every client subscribes to all"
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured window, seconds (default 20)")
    p.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of traffic before measuring (default 5)"
    )
    p.add_argument("--slow-fraction", type=float, default=0.0, help="fraction of clients that never read")
    p.add_argument("--write-delay-ms", type=float, default=0.0, help="edge only: FXPROXY_WRITE_DELAY (ms)")
    p.add_argument("--compare", action="store_true", help="run edge, naive, broadcast and node")
    p.add_argument(
        "--servers", default=None, help=f"comma list out of {','.join(ALL_SERVERS)} (default edge)"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per server, alternating servers")
    p.add_argument(
        "--cpu",
        default="1",
        help="CPU list for the server under test (taskset -c); '' = no pinning",
    )
    p.add_argument("--connect-rate", type=float, default=2000.0, help="new connections per second")
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds to wait for the server's port")
    p.add_argument(
        "--edge-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the edge",
    )
    p.add_argument(
        "--max-rate",
        type=float,
        default=0.0,
        help="also run the edge with every client subscribed at this max_rate (ticks/s per symbol)",
    )
    p.add_argument(
        "--baseline-ref",
        action="append",
        default=[],
        metavar="GIT_REF",
        help="also run the edge as it was at this git ref (a worktree in bench/.build), e.g. HEAD~5",
    )
    p.add_argument(
        "--workers",
        default="1",
        help="edge worker processes (FXPROXY_WORKERS: N or auto), all pinned to --cpu (default 1)",
    )
    p.add_argument(
        "--workers-compare",
        default="",
        metavar="N,M",
        help="run the edge once per worker count, side by side (e.g. 1,2); replaces the plain edge",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON instead of tables")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.servers:
        servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    elif args.compare:
        servers = list(ALL_SERVERS)
    else:
        servers = ["edge"]
    try:
        args.workers = len(os.sched_getaffinity(0)) if args.workers == "auto" else int(args.workers)
        compare = [int(n) for n in args.workers_compare.split(",") if n.strip()]
    except ValueError:
        p.error("--workers takes a number or auto, --workers-compare numbers like 1,2")
    if args.workers < 1 or any(n < 1 for n in compare):
        p.error("worker counts must be 1 or more")
    if compare:
        at = servers.index("edge") if "edge" in servers else len(servers)
        specs = [edge_with_workers(n) for n in compare]
        servers[at : at + ("edge" in servers)] = [spec.name for spec in specs]
        SERVERS.update({spec.name: spec for spec in specs})
    elif args.workers > 1:
        SERVERS["edge"] = edge_with_workers(args.workers)
        SERVERS["edge"].name = "edge"
    if args.max_rate:
        spec = SERVERS["edge"]
        name = f"edge max_rate={args.max_rate:g}"
        SERVERS[name] = ServerSpec(name, spec.argv, spec.env, spec.available, spec.metrics_prefix,
                                   ("--max-rate", str(args.max_rate)), spec.workers)
        servers.append(name)
    for ref in args.baseline_ref:
        spec = baseline_edge(ref)
        SERVERS[spec.name] = spec
        servers.append(spec.name)
    bad = [s for s in servers if s not in SERVERS]
    if bad:
        p.error(f"unknown server(s): {', '.join(bad)}")
    args.server_list = servers
    if args.clients <= 0 or args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        p.error("--clients, --rate, --duration, --repeat must be positive")
    if not 0.0 <= args.slow_fraction <= 1.0:
        p.error("--slow-fraction must be within [0, 1]")
    if not 1 <= args.symbols <= len(ALL_SYMBOLS):
        p.error(f"--symbols must be within [1, {len(ALL_SYMBOLS)}]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not found on PATH")
    raise_nofile()
    loadclient = build_loadclient()
    if args.write_delay_ms and any(s != "edge" for s in args.server_list):
        progress("note: --write-delay-ms only applies to the edge")

    # SIGTERM -> KeyboardInterrupt so the finally blocks stop every child
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    skipped: dict[str, str] = {}
    results: list[RunResult] = []
    for name in args.server_list:
        reason = SERVERS[name].available()
        if reason:
            skipped[name] = reason
            progress(f"skipping {name}: {reason}")
    runnable = [s for s in args.server_list if s not in skipped]
    progress(f"workload: {describe(args)}; servers: {','.join(runnable)}")
    try:
        for run_no, name in iter_runs(runnable, args.repeat):
            progress(f"run {run_no}/{args.repeat}: {name}")
            r = run_one(SERVERS[name], run_no, args, loadclient)
            results.append(r)
            if r.ok:
                m = r.metrics
                progress(
                    f"{name}-{run_no}: {fmt(m.get('deliveries_per_s'), '{:,.0f}')} deliveries/s, "
                    f"{fmt(m.get('cpu_us_per_delivery'), '{:.2f}')} CPU µs/delivery, "
                    f"p99 {fmt(m.get('lat_p99_ms'), '{:.2f}')} ms"
                )
    except KeyboardInterrupt:
        progress("interrupted")
        return 130

    summary: dict[str, dict[str, Any]] = {}
    for name in runnable:
        ok = [r for r in results if r.server == name and r.ok]
        if ok:
            summary[name] = median_metrics(ok)
    base = "edge" if "edge" in summary else (next(iter(summary)) if summary else "")
    rat = ratios(summary, base) if len(summary) > 1 else {}

    if args.json:
        doc = {
            "workload": {
                "clients": args.clients,
                "rate": args.rate,
                "symbols": args.symbols,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "slow_fraction": args.slow_fraction,
                "write_delay_ms": args.write_delay_ms,
                "server_cpu": args.cpu,
                "edge_workers": args.workers_compare or args.workers,
                "repeat": args.repeat,
            },
            "runs": [
                {
                    "server": r.server,
                    "run": r.run,
                    "ok": r.ok,
                    "error": r.error,
                    "metrics": r.metrics,
                    "client": r.client,
                    "publisher": r.publisher,
                    "warnings": r.warnings,
                    "server_metrics": r.server_metrics,
                }
                for r in results
            ],
            "summary": summary,
            "cpu_per_delivery_ratio_base": base or None,
            "cpu_per_delivery_ratios": rat,
            "skipped": skipped,
        }
        print(json.dumps(doc, indent=2))
    else:
        print()
        print(f"fan-out: {describe(args)}")
        print()
        slow = args.slow_fraction > 0
        rows = [(f"{r.server}#{r.run}", r.metrics) for r in results if r.ok]
        workers = any(SERVERS[r.server].workers > 1 for r in results)
        print_table(rows, "runs:", slow, workers)
        if args.repeat > 1 and summary:
            print_table(list(summary.items()), "median per server:", slow, workers)
        for r in results:
            for w in r.metrics.get("workers", []):
                print(f"{r.server}#{r.run} worker pid {w['pid']}: {w['clients']} clients, "
                      f"CPU {fmt(w['cpu_pct'], '{:.0f}')}%, "
                      f"{fmt(w['cpu_us_per_delivery'], '{:.2f}')} CPU µs/delivery")
        for r in results:
            if not r.ok:
                print(f"{r.server}#{r.run}: FAILED: {r.error}")
        for name, reason in skipped.items():
            print(f"{name}: skipped: {reason}")
        if rat:
            print(f"CPU per delivery, {base} / other (below 1 = {base} is cheaper):")
            for name, v in rat.items():
                print(f"  {base} / {name} = {v:.2f}")
        for r in results:
            if r.server_metrics:
                shown = {
                    k.removeprefix(SERVERS[r.server].metrics_prefix or ""): v
                    for k, v in r.server_metrics.items()
                    if v
                }
                text = ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items()))
                print(f"{r.server}#{r.run} server metrics (whole run): {text}")
        for r in results:
            for w in r.warnings:
                print(f"warning: {r.server}#{r.run}: {w}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
