"""Run the shipped nginx config (deploy/nginx/fxproxy.conf) in front of test edges.

    with run_nginx([edge_port_1, edge_port_2]) as port:
        ...  # ws://127.0.0.1:{port}/v1/stream goes through nginx to the edges

The server block is the real one from deploy/nginx/fxproxy.conf, with exactly
two rewrites so it can run unprivileged on loopback: its `listen 8080;` line
becomes `listen 127.0.0.1:<port>;` and its /var/log/nginx/ paths point into a
temporary folder. Everything nginx writes (pid, logs, temp files) lives in that
folder, which is removed afterwards. The upstream is written by the helper,
with the same balancing method as deploy/nginx/upstream.conf.

nginx is found on PATH or in /usr/sbin; when it is missing and we are root on
Debian, it is installed with apt-get (nginx-light, or nginx where that package
is gone). Otherwise RuntimeError: the end-to-end tests need nginx and must not
silently skip.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .debian import find_or_install
from .ports import free_port

__all__ = ["SHIPPED_CONF", "find_nginx", "render_server_block", "run_nginx"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO_ROOT / "deploy" / "nginx" / "fxproxy.conf"

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
# Graceful stop (SIGQUIT) waits for open connections, and a WebSocket may never
# close by itself: cut them after this long so a test's exit stays fast.
_WORKER_SHUTDOWN_TIMEOUT = "1s"
_START_ATTEMPTS = 3

_LISTEN_RE = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+8080;[ \t]*$", re.MULTILINE)
_LOG_DIR = "/var/log/nginx/"


def find_nginx() -> str:
    """Return the path of an nginx binary, installing nginx-light (or nginx) if need be."""
    return find_or_install(["nginx"], ["/usr/sbin/nginx", "/usr/local/sbin/nginx",
                                       "/usr/local/nginx/sbin/nginx"],
                           ["nginx-light", "nginx"], "the end-to-end tests")


def render_server_block(port: int, log_dir: Path, source: Path = SHIPPED_CONF) -> str:
    """The shipped fxproxy.conf with its listen line bound to 127.0.0.1:port and logs in log_dir.

    Raises RuntimeError if the shipped file no longer has exactly one `listen 8080;`
    line, so a change of shape fails loudly instead of testing something else.
    """
    text = source.read_text(encoding="utf-8")
    text, count = _LISTEN_RE.subn(rf"\g<indent>listen 127.0.0.1:{port};", text)
    if count != 1:
        raise RuntimeError(f"{source}: expected exactly one `listen 8080;` line to rewrite, found {count}")
    return text.replace(_LOG_DIR, f"{log_dir}/")


def _compiled_without(nginx: str) -> set[str]:
    """Modules compiled out of this nginx (from `nginx -V`), e.g. {"http_uwsgi_module"}."""
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False)
    return set(re.findall(r"--without-([a-z0-9_]+)", out.stdout + out.stderr))


def _user_directive() -> str:
    """A `user` line for root: workers drop to `nobody`. Not root: none (it would be ignored)."""
    if os.geteuid() != 0:
        return ""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return "user root;"  # no unprivileged account to drop to
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return f"user {entry.pw_name} {group};"


def _main_conf(tmp: Path, nginx: str) -> str:
    without = _compiled_without(nginx)
    temp_paths = [
        f"client_body_temp_path {tmp}/temp/client_body;",
        f"proxy_temp_path {tmp}/temp/proxy;",
    ]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"http_{module}_module" not in without:
            temp_paths.append(f"{module}_temp_path {tmp}/temp/{module};")
    temp_lines = "\n    ".join(temp_paths)
    return f"""# written by tests/support/nginx.py
daemon off;
master_process on;
worker_processes 1;
worker_shutdown_timeout {_WORKER_SHUTDOWN_TIMEOUT};
{_user_directive()}
pid {tmp}/nginx.pid;
error_log {tmp}/logs/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    access_log {tmp}/logs/access.log;
    {temp_lines}
    include {tmp}/upstream.conf;
    include {tmp}/fxproxy.conf;
}}
"""


def _upstream_conf(edge_ports: list[int]) -> str:
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in edge_ports)
    return f"""# written by tests/support/nginx.py (mirrors deploy/nginx/upstream.conf)
upstream fxproxy_edges {{
    least_conn;
{servers}
}}
"""


def _nginx_answers(port: int) -> bool:
    """True if an nginx answers HTTP on 127.0.0.1:port.

    Not just "the port accepts": another process may have taken the port that
    free_port() handed out, and its listener would accept too. The probe path
    hits the shipped catch-all `location /` (a 404 from nginx itself, never
    proxied to an edge), and nginx names itself in the Server header.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"GET /__nginx_probe HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return b"\r\nserver: nginx" in head.lower()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop exactly this nginx: graceful SIGQUIT, then SIGKILL to its own process group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The master was started in a session of its own, so its group holds
        # just it and its workers: kill them all, nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=_STOP_TIMEOUT)


def _start(tmp: Path, nginx: str, port: int) -> subprocess.Popen[bytes]:
    """Start nginx on port; return it once nginx itself answers there.

    Raises RuntimeError (with the error log) if it exits or does not listen in time.
    """
    (tmp / "fxproxy.conf").write_text(render_server_block(port, tmp / "logs"), encoding="utf-8")
    conf = tmp / "nginx.conf"
    conf.write_text(_main_conf(tmp, nginx), encoding="utf-8")
    errlog = tmp / "logs" / "error.log"
    output = tmp / "logs" / "stdout.log"
    with output.open("ab") as out:
        proc = subprocess.Popen(
            [nginx, "-p", f"{tmp}/", "-c", str(conf), "-e", str(errlog)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _nginx_answers(port):
            return proc
        time.sleep(0.05)
    exited = proc.poll()
    _stop(proc)
    what = (
        f"exited with code {exited}"
        if exited is not None
        else f"did not answer within {_STARTUP_TIMEOUT:.0f} s"
    )
    raise RuntimeError(
        f"nginx on 127.0.0.1:{port} {what} (config {conf}).\n"
        f"--- error log ---\n{_read(errlog)}--- output ---\n{_read(output)}"
    )


@contextlib.contextmanager
def run_nginx(edge_ports: list[int]) -> Iterator[int]:
    """Run nginx with the shipped server block, balancing over 127.0.0.1:<edge_ports>.

    Yields the loopback port nginx listens on. On exit, stops that nginx
    (SIGQUIT, SIGKILL after a timeout) and removes its temporary folder.
    """
    if not edge_ports:
        raise ValueError("run_nginx needs at least one edge port")
    nginx = find_nginx()
    tmp = Path(tempfile.mkdtemp(prefix="fxproxy-nginx-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Workers (as `nobody` when we are root) must reach the temp folders.
        tmp.chmod(0o755)
        (tmp / "logs").mkdir()
        (tmp / "temp").mkdir()
        (tmp / "upstream.conf").write_text(_upstream_conf(edge_ports), encoding="utf-8")
        attempt = 0
        while proc is None:
            attempt += 1
            port = free_port()
            try:
                proc = _start(tmp, nginx, port)
            except RuntimeError as exc:
                # The free port may have been taken between free_port() and
                # nginx's bind: try another one; anything else is fatal.
                if "Address already in use" not in str(exc) or attempt >= _START_ATTEMPTS:
                    raise
        yield port
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
