"""RFC 6455 conformance of the edge's connection code: Autobahn TestSuite 0.8.2, cases 1-7.

    .venv/bin/python bench/autobahn/run.py [--outdir DIR] [--cases 1.* 2.* ...]

Starts two echo servers on free loopback ports: the edge's real Connection with an echo handler
(echo_edge.py, uvloop) and plain websockets as a baseline (echo_websockets.py); runs
`wstest -m fuzzingclient` against both; stops exactly the processes it started; prints a
per-group summary and the cases the edge FAILS that websockets does not.

wstest 0.8.2 needs Python 2.7. It lives in a virtualenv outside the repo, made on first run:
$FXPROXY_AUTOBAHN_VENV (default ~/.cache/fxproxy-autobahn) from $FXPROXY_PY27 (default: pyenv's
2.7.18, else python2.7 on PATH), with the pins in requirements-py27.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import websockets

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path.home() / ".cache"
VENV = Path(os.environ.get("FXPROXY_AUTOBAHN_VENV", CACHE / "fxproxy-autobahn"))
TOOL_VENV = CACHE / "fxproxy-autobahn-tool"  # a Python 3 venv holding virtualenv<20.22
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"]
BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
START_TIMEOUT = 10.0
WSTEST_TIMEOUT = 20 * 60.0
SERVERS = {"edge": "echo_edge.py", "websockets": "echo_websockets.py"}


class RunError(Exception):
    pass


def python27() -> str:
    for candidate in (os.environ.get("FXPROXY_PY27"), "/root/.pyenv/versions/2.7.18/bin/python",
                      str(Path.home() / ".pyenv/versions/2.7.18/bin/python"), shutil.which("python2.7")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RunError("no Python 2.7 found: set FXPROXY_PY27 to a python2.7 interpreter")


def ensure_wstest() -> Path:
    wstest = VENV / "bin" / "wstest"
    if wstest.is_file():
        return wstest
    print(f"creating the Autobahn virtualenv at {VENV} (once)", flush=True)
    virtualenv = TOOL_VENV / "bin" / "virtualenv"
    if not virtualenv.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(TOOL_VENV)], check=True)
        subprocess.run([str(TOOL_VENV / "bin" / "pip"), "install", "-q", "virtualenv<20.22"], check=True)
    subprocess.run([str(virtualenv), "-q", "-p", python27(), str(VENV)], check=True)
    # Every pin, without resolving: autobahntestsuite 0.8.2 predates most of its dependencies.
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--no-deps",
                    "-r", str(HERE / "requirements-py27.txt")], check=True)
    if not wstest.is_file():
        raise RunError(f"installing autobahntestsuite did not produce {wstest}")
    return wstest


def start_server(name: str, script: str, logdir: Path) -> tuple[subprocess.Popen[str], int]:
    """Start one echo server on a free port; wait (bounded) for its LISTENING line."""
    log = (logdir / f"{name}.stderr.log").open("w")
    proc = subprocess.Popen([sys.executable, str(HERE / script), "0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    log.close()
    assert proc.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(readline(proc.stdout)), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    if not line or not line[0].startswith("LISTENING "):
        stop(proc)
        raise RunError(f"{name} echo server did not start within {START_TIMEOUT:.0f} s "
                       f"(see {logdir / f'{name}.stderr.log'})")
    return proc, int(line[0].split()[1])


def readline(stream: IO[str] | None) -> str:
    return stream.readline() if stream is not None else ""


def stop(proc: subprocess.Popen[Any]) -> None:
    """End one process we started: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_wstest(wstest: Path, ports: dict[str, int], outdir: Path, cases: list[str]) -> float:
    spec = {
        "outdir": str(outdir / "reports"),
        "servers": [{"agent": name, "url": f"ws://127.0.0.1:{port}/v1/stream"}
                    for name, port in ports.items()],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = outdir / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    started = time.monotonic()
    with (outdir / "wstest.log").open("w") as log:
        proc = subprocess.Popen([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)], cwd=outdir,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(WSTEST_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise RunError(
                f"wstest exceeded {WSTEST_TIMEOUT / 60:.0f} min (see {outdir / 'wstest.log'})"
            ) from None
        finally:
            stop(proc)
    if rc != 0:
        raise RunError(f"wstest exited {rc} (see {outdir / 'wstest.log'})")
    return time.monotonic() - started


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def summarize(outdir: Path, duration: float) -> None:
    reports = outdir / "reports"
    index = json.loads((reports / "index.json").read_text())
    agents = list(SERVERS)
    groups = sorted({case.split(".")[0] for agent in agents for case in index[agent]}, key=int)
    extra = sorted({r["behavior"] for a in agents for r in index[a].values()} - set(BEHAVIORS))
    behaviors = BEHAVIORS + extra
    short = {"OK": "OK", "NON-STRICT": "NS", "INFORMATIONAL": "INFO", "UNIMPLEMENTED": "UNIMP",
             "FAILED": "FAIL"}
    print(f"\nAutobahn TestSuite 0.8.2, fuzzingclient; websockets {websockets.__version__}; "
          f"wstest took {duration:.0f} s; reports in {reports}\n")
    header = ["group"] + [f"{a} {short.get(b, b)}" for a in agents for b in behaviors]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    totals = {(a, b): 0 for a in agents for b in behaviors}
    for group in [*groups, "total"]:
        cells = [group]
        for a in agents:
            for b in behaviors:
                if group == "total":
                    n = totals[(a, b)]
                else:
                    n = sum(1 for c, r in index[a].items() if c.split(".")[0] == group and r["behavior"] == b)
                    totals[(a, b)] += n
                cells.append(str(n))
        print("| " + " | ".join(cells) + " |")
    edge, base = index["edge"], index["websockets"]
    failed = sorted((c for c, r in edge.items() if r["behavior"] == "FAILED"
                     and base.get(c, {}).get("behavior") != "FAILED"), key=case_key)
    print(f"\nCases the edge FAILS and websockets does not: {len(failed) or 'none'}")
    for case in failed:
        describe(case, edge[case], base.get(case, {}), reports)
    differ = sorted((c for c, r in edge.items()
                     if c not in failed and outcome(r) != outcome(base.get(c, {}))), key=case_key)
    if differ:
        print("\nOther cases where the two differ (behavior or close behavior):")
        for case in differ:
            describe(case, edge[case], base.get(case, {}), reports)


def outcome(result: dict[str, Any]) -> tuple[Any, Any]:
    return result.get("behavior"), result.get("behaviorClose")


def describe(case: str, edge: dict[str, Any], base: dict[str, Any], reports: Path) -> None:
    detail = ""
    report = reports / str(edge.get("reportfile", "")).replace(".html", ".json")
    if report.is_file():
        data = json.loads(report.read_text())
        detail = f" -- {data.get('result', '')} / close: {data.get('resultClose', '')}"
    print(f"  {case}: edge {edge['behavior']} (close {edge.get('behaviorClose')}, "
          f"code {edge.get('remoteCloseCode')}); websockets {base.get('behavior')} "
          f"(close {base.get('behaviorClose')}, code {base.get('remoteCloseCode')}){detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=None,
                        help="where reports and logs go (default: a new directory under /tmp)")
    parser.add_argument("--cases", nargs="+", default=CASES, help="Autobahn case patterns")
    args = parser.parse_args()
    outdir = args.outdir or Path(tempfile.mkdtemp(prefix="fxproxy-autobahn-", dir="/tmp"))
    outdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        wstest = ensure_wstest()
        ports = {}
        for name, script in SERVERS.items():
            proc, ports[name] = start_server(name, script, outdir)
            procs.append(proc)
        print(f"servers: {ports}; running wstest (cases {' '.join(args.cases)})...", flush=True)
        duration = run_wstest(wstest, ports, outdir, args.cases)
    except (RunError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            stop(proc)
    summarize(outdir, duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
