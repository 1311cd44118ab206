"""Find a system program the tests need, installing its Debian package when missing.

The program is looked for on PATH and in the given places; when it is missing
and we are root on Debian, its package is installed with apt-get (no
recommends; the next package name is tried if one does not exist; `apt-get
update` only if the first attempt fails). Installing never starts a packaged
service (nginx on :80, Prometheus on :9090): where no policy-rc.d forbids that,
one is put in place for the duration. Parallel test workers wait for each other
on a lock instead of fighting over dpkg. Otherwise RuntimeError: a test that
needs the program must fail, never skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["find_or_install"]

_APT_TIMEOUT = 900.0
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "fxproxy-apt-install.lock"


def _which(names: Sequence[str], places: Sequence[str]) -> str | None:
    for candidate in (*places, *(shutil.which(name) for name in names)):
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


def _apt_install(packages: Sequence[str]) -> str:
    """Install the first of `packages` that installs; return what went wrong, or "" on success."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# temporary, tests/support/debian.py\nexit 101\n")
        policy.chmod(0o755)
    try:
        problems: list[str] = []
        for refresh in (False, True):
            if refresh:
                problem = _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], env)
                if problem:
                    problems.append(problem)
                    break
            for package in packages:
                problem = _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
                                "--no-install-recommends", package], env)
                if not problem:
                    return ""
                problems.append(problem)
        return "\n".join(problems)
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)


def find_or_install(names: Sequence[str], places: Sequence[str], packages: Sequence[str],
                    needed_by: str) -> str:
    """The path of the program (`names` on PATH, or one of `places`), installed if need be."""
    found = _which(names, places)
    if found:
        return found
    problem = ""
    if os.geteuid() == 0 and Path("/etc/debian_version").exists() and shutil.which("apt-get"):
        with open(_INSTALL_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                problem = "" if _which(names, places) else _apt_install(packages)
                found = _which(names, places)
                if found:
                    return found
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:
        problem = "not root on Debian, so it was not installed automatically"
    raise RuntimeError(
        f"{names[0]} is required by {needed_by} but was not found "
        f"({problem or 'installation reported success but no binary appeared'}). "
        f"Install it, e.g. `apt-get install -y --no-install-recommends {packages[0]}`."
    )
