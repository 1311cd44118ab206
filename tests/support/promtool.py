"""Find Prometheus' `promtool` for the monitoring tests, installing Debian's package when missing.

`promtool` is found on PATH or in /usr/bin; when it is missing and we are root
on Debian, the `prometheus` package is installed with apt-get (no recommends;
`apt-get update` only if the first attempt fails). Installing must not start
the packaged Prometheus service (it would listen on port 9090 of every
interface): where no policy-rc.d forbids starting services, one is put in place
for the duration of the install. Otherwise RuntimeError: the monitoring tests
must fail, not skip, when promtool cannot be had.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["find_promtool", "run_promtool"]

_APT_PACKAGE = "prometheus"
_APT_TIMEOUT = 900.0
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "fxproxy-promtool-install.lock"


def _which_promtool() -> str | None:
    for candidate in (shutil.which("promtool"), "/usr/bin/promtool", "/usr/local/bin/promtool"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _run(cmd: list[str], env: dict[str, str]) -> str:
    """Run an apt command; return "" on success, else what went wrong."""
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=_APT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"`{' '.join(cmd)}` took longer than {_APT_TIMEOUT:.0f} s"
    if done.returncode != 0:
        return f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-2000:]}"
    return ""


def _apt_install() -> str:
    """Install Debian's prometheus package; return what went wrong, or "" on success."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for a dpkg lock held by another installer (other test sessions) instead of failing.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends",
               _APT_PACKAGE]
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# temporary, tests/support/promtool.py\nexit 101\n")
        policy.chmod(0o755)
    try:
        problem = _run(install, env)
        if not problem:
            return ""
        refresh = _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], env)
        if refresh:
            return f"{problem}\n{refresh}"
        again = _run(install, env)
        return f"{problem}\n{again}" if again else ""
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)


def find_promtool() -> str:
    """Return the path of promtool, installing Debian's `prometheus` if needed (root on Debian).

    Raises RuntimeError when none can be had.
    """
    found = _which_promtool()
    if found:
        return found
    problem = ""
    if os.geteuid() == 0 and Path("/etc/debian_version").exists() and shutil.which("apt-get"):
        # Parallel test workers would fight over the dpkg lock: one installs,
        # the others wait and then find the binary.
        with open(_INSTALL_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                found = _which_promtool()
                if found:
                    return found
                problem = _apt_install()
                found = _which_promtool()
                if found:
                    return found
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:
        problem = "not root on Debian, so it was not installed automatically"
    raise RuntimeError(
        "promtool is required by tests/integration/test_monitoring.py but was not found on PATH or "
        f"in /usr/bin ({problem or 'installation reported success but no binary appeared'}). "
        f"Install it, e.g. `apt-get install -y --no-install-recommends {_APT_PACKAGE}`."
    )


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `promtool ARGS...` (offline, 60 s at most) and return what it did; never raises on failure."""
    return subprocess.run([find_promtool(), *args], capture_output=True, text=True, check=False,
                          timeout=60, cwd=cwd)
