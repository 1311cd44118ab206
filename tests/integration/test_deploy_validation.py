"""The deploy files validate offline, a broken copy of each kind is rejected, and the Redis setups work.

`make validate` (tests/support/deploy_check.py) runs check-jsonschema (compose-spec),
kubernetes-validate --strict, hadolint, nginx -t and redis-server on the shipped files; here the
same checks run on the shipped files (they pass) and on copies in a temporary folder with one
mistake each (they must fail, naming the mistake). The Redis setups themselves run in
test_deploy_redis_setups.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.debian import find_or_install
from tests.support.deploy_check import (
    REPO_ROOT,
    Problem,
    check_compose,
    check_dockerfiles,
    check_kustomization,
    check_manifests,
    check_nginx,
    check_redis_configs,
    shipped,
    validate,
)
from tests.support.deploy_settings import check_settings

REDIS_DIR = REPO_ROOT / "deploy" / "redis"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the deploy files (compose files and deploy/) to break one thing in."""
    for compose in REPO_ROOT.glob("docker-compose*.yml"):
        shutil.copy2(compose, tmp_path / compose.name)
    shutil.copytree(REPO_ROOT / "deploy", tmp_path / "deploy")
    return tmp_path


def break_file(path: Path, old: str, new: str) -> None:
    """Replace exactly one occurrence of old, so the test breaks what it says it breaks."""
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{path.name}: expected {old!r} exactly once"
    path.write_text(text.replace(old, new), encoding="utf-8")


def details(problems: list[Problem]) -> str:
    return "\n".join(str(p) for p in problems)


# -- the shipped files -----------------------------------------------------------------------------


@pytest.mark.integration  # the Redis configs run in a real redis-server
def test_every_shipped_deploy_file_passes_every_check() -> None:
    lines: list[str] = []
    started = time.monotonic()
    problems = validate(REPO_ROOT, report=lines.append)
    took = time.monotonic() - started
    print(f"make validate's checks: {took:.1f} s", *lines, sep="\n")
    assert problems == [], details(problems)
    assert len(lines) == 8 and all(line.startswith("ok") for line in lines[:7]), lines
    assert lines[-1] == "validate: 7 of 7 checks ok", lines
    files = shipped(REPO_ROOT)
    # What the checks ran on: the default compose file and both overrides, every manifest, the Dockerfile.
    assert {p.name for p in files.compose} >= {"docker-compose.yml", "docker-compose.cluster.yml",
                                               "docker-compose.sentinel.yml"}
    assert {p.name for p in files.manifests} >= {"edge.yaml", "ingestor.yaml", "redis.yaml", "configmap.yaml"}
    assert [p.name for p in files.dockerfiles] == ["Dockerfile"]
    assert took < 60


_OFFLINE_CHECKS = """
import sys
from tests.support.deploy_check import check_compose, check_dockerfiles, check_manifests, shipped
files = shipped()
problems = [*check_compose(files.compose), *check_manifests(files.manifests),
            *check_dockerfiles(files.dockerfiles)]
print(*problems, sep="\\n")
sys.exit(1 if problems else 0)
"""


def test_the_schema_and_lint_checks_need_no_network() -> None:
    """The compose-spec and Kubernetes schemas and hadolint ship inside their packages: the three
    tool checks pass in a network namespace of their own, which has no interface up at all."""
    unshare = find_or_install(["unshare"], ["/usr/bin/unshare"], ["util-linux"], __name__)
    started = time.monotonic()
    done = subprocess.run([unshare, "--net", sys.executable, "-c", _OFFLINE_CHECKS], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    print(f"offline compose, Kubernetes and Dockerfile checks: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr


# -- broken copies ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_make_validate_fails_on_one_broken_file_and_says_which_check(checkout: Path) -> None:
    break_file(checkout / "deploy" / "k8s" / "ingestor.yaml", "  replicas: 2\n", "  replicas: two\n")
    lines: list[str] = []
    problems = validate(checkout, report=lines.append)
    assert [p.check for p in problems] == ["kubernetes"], details(problems)
    verdicts = [line.split()[:2] for line in lines if not line.startswith(" ")]
    assert verdicts == [["ok", "compose"], ["FAIL", "kubernetes"], ["ok", "kustomization"],
                        ["ok", "fxproxy"], ["ok", "dockerfiles"], ["ok", "nginx"], ["ok", "redis"],
                        ["validate:", "6"]], lines
    assert lines[-1] == "validate: 6 of 7 checks ok", lines
    assert any("ingestor.yaml" in line and "replicas" in line for line in lines), lines


@pytest.mark.parametrize(("file", "old", "new", "named"), [
    # a key compose does not know (a typo of stop_grace_period)
    ("docker-compose.yml", "    stop_grace_period: 20s", "    stop_grace_perod: 20s", "stop_grace_perod"),
    # a wrong type: expose takes a list
    ("docker-compose.yml", '    expose:\n      - "8080"', '    expose: "8080"', "expose"),
    # in an override too
    ("docker-compose.cluster.yml", '    restart: "no"', "    restart: false", "restart"),
    # an override that depends on a service no file defines
    ("docker-compose.cluster.yml", "\n  redis-cluster-init:\n", "\n  redis-init:\n", "redis-cluster-init"),
    # a bind mount of a folder that is not there
    ("docker-compose.sentinel.yml", "./deploy/redis:/usr", "./deploy/redis-conf:/usr", "deploy/redis-conf"),
])
def test_a_broken_compose_file_is_rejected(checkout: Path, file: str, old: str, new: str,
                                           named: str) -> None:
    break_file(checkout / file, old, new)
    problems = check_compose(shipped(checkout).compose, checkout / "docker-compose.yml")
    assert problems, f"{file} with {new!r} passed"
    assert named in details(problems), details(problems)


@pytest.mark.parametrize(("file", "old", "new", "named"), [
    # a wrong field type: replicas is an integer
    ("edge.yaml", "  replicas: 3\n", '  replicas: "3"\n', "is not of type 'integer'"),
    # an unknown field (strict mode)
    ("edge.yaml", "      terminationGracePeriodSeconds: 30", "      terminationGracePeriodSecond: 30",
     "'terminationGracePeriodSecond' was unexpected"),
    # a field in the wrong place: minReadySeconds belongs to the Deployment, not its pod template
    ("ingestor.yaml", "      enableServiceLinks: false\n",
     "      enableServiceLinks: false\n      minReadySeconds: 5\n", "'minReadySeconds' was unexpected"),
    # a misspelt kind: the tool only warns that it has no schema; that must fail too
    ("edge.yaml", "kind: PodDisruptionBudget", "kind: PodDisruptionBudjet", "PodDisruptionBudjet"),
])
def test_a_broken_kubernetes_manifest_is_rejected(checkout: Path, file: str, old: str, new: str,
                                                  named: str) -> None:
    break_file(checkout / "deploy" / "k8s" / file, old, new)
    problems = check_manifests(shipped(checkout).manifests)
    assert problems, f"{file} with {new.strip()!r} passed"
    assert named in details(problems) and file in details(problems), details(problems)


@pytest.mark.parametrize(("old", "new", "named"), [
    ("  - ingestor.yaml\n", "", "ingestor.yaml is not listed"),
    ("  - simfeed.yaml ", "  - simfeeds.yaml ", "simfeeds.yaml does not exist"),
])
def test_a_kustomization_that_misses_or_invents_a_manifest_is_rejected(checkout: Path, old: str, new: str,
                                                                       named: str) -> None:
    files = shipped(checkout)
    break_file(files.kustomization, old, new)
    problems = check_kustomization(files.kustomization, files.manifests)
    assert named in details(problems), details(problems)


@pytest.mark.parametrize(("file", "old", "new", "named"), [
    # a misspelt setting: the process would only warn and keep the default
    ("docker-compose.yml", 'FXPROXY_DRAIN_TIMEOUT: "10"', 'FXPROXY_DRAIN_TIMOUT: "10"',
     "docker-compose.yml: edge: FXPROXY_DRAIN_TIMOUT is not an fxproxy setting "
     "(did you mean FXPROXY_DRAIN_TIMEOUT?)"),
    # a flag value the edge refuses at start, in an override
    ("docker-compose.cluster.yml", '"--workers", "2"', '"--workers", "two"', "bad workers 'two'"),
    # a flag no command has
    ("docker-compose.yml", '["ingestor"]', '["ingestor", "--symbolz", "EURUSD"]',
     "unrecognized arguments: --symbolz"),
    # a bad value in the ConfigMap every Deployment reads
    ("deploy/k8s/configmap.yaml", 'FXPROXY_DRAIN_TIMEOUT: "10"', 'FXPROXY_DRAIN_TIMEOUT: "ten"',
     "drain_timeout (FXPROXY_DRAIN_TIMEOUT)"),
    # a misspelt name in a container's own env
    ("deploy/k8s/edge.yaml", "- name: FXPROXY_WORKERS", "- name: FXPROXY_WORKER",
     "edge.yaml: edge/edge: FXPROXY_WORKER is not an fxproxy setting"),
])
def test_fxproxy_settings_the_process_would_refuse_or_ignore_are_rejected(
    checkout: Path, file: str, old: str, new: str, named: str,
) -> None:
    break_file(checkout / file, old, new)
    files = shipped(checkout)
    problems = check_settings(files.compose, files.manifests)
    said = "\n".join(why for _, why in problems)
    assert named in said, said


@pytest.mark.parametrize(("old", "new", "rule"), [
    ("WORKDIR /tmp", "WORKDIR tmp", "DL3000"),                     # error: relative WORKDIR
    ('ENTRYPOINT ["fxproxy"]', "ENTRYPOINT fxproxy", "DL3025"),    # warning: shell form, no signals
    ("COPY shared/ shared/", "ADD shared/ shared/", "DL3020"),     # error: ADD for local files
])
def test_a_dockerfile_with_a_hadolint_finding_is_rejected(checkout: Path, old: str, new: str,
                                                          rule: str) -> None:
    dockerfile = checkout / "deploy" / "Dockerfile"
    break_file(dockerfile, old, new)
    problems = check_dockerfiles([dockerfile])
    assert rule in details(problems), details(problems)


@pytest.mark.parametrize(("file", "old", "new", "named"), [
    ("fxproxy.conf", "proxy_read_timeout 1h;", "proxy_read_timout 1h;", "unknown directive"),
    ("nginx.conf", "worker_connections 16384;", "worker_connections lots;", "invalid number"),
    ("upstream.conf", "least_conn;", "least_conn", 'invalid number of arguments in "least_conn"'),
])
def test_a_broken_nginx_config_is_rejected(checkout: Path, file: str, old: str, new: str, named: str) -> None:
    break_file(checkout / "deploy" / "nginx" / file, old, new)
    problems = check_nginx(checkout / "deploy" / "nginx")
    assert named in details(problems), details(problems)


@pytest.mark.integration
@pytest.mark.parametrize(("file", "old", "new"), [
    ("cluster-node.conf", "appendfsync everysec", "appendfsync evrysec"),
    ("cluster-node.conf", "cluster-node-timeout 5000", "cluster-node-timout 5000"),
    ("sentinel.conf", "sentinel down-after-milliseconds fxproxy 5000",
     "sentinel down-after-milisecond fxproxy 5000"),
])
def test_a_broken_redis_config_is_rejected(checkout: Path, file: str, old: str, new: str) -> None:
    break_file(checkout / "deploy" / "redis" / file, old, new)
    problems = check_redis_configs(checkout / "deploy" / "redis")
    assert [p.path.name for p in problems] == [file], details(problems)
    assert "exited" in problems[0].detail, problems[0].detail


def test_ci_validates_the_deploy_files_after_the_readme_test_command_and_the_linters() -> None:
    steps = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith("make ")]
    assert steps == ["make test", "make lint", "make validate"], steps
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "\nvalidate:" in makefile and "scripts/validate-deploy" in makefile
    assert "make validate" in (REPO_ROOT / "README.md").read_text()


# -- what the files say ----------------------------------------------------------------------------


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(("file", "scheme", "suffix"), [
    ("docker-compose.cluster.yml", "redis+cluster", ""),
    ("docker-compose.sentinel.yml", "redis+sentinel", "/fxproxy"),
])
def test_each_compose_override_points_fxproxy_at_its_own_redis_and_runs_edge_workers(
        file: str, scheme: str, suffix: str) -> None:
    services = load(REPO_ROOT / file)["services"]
    base = load(REPO_ROOT / "docker-compose.yml")["services"]
    for role in ("ingestor", "edge"):
        url = services[role]["environment"]["FXPROXY_REDIS_URL"]
        parts = urlsplit(url)
        assert parts.scheme == scheme and parts.path == suffix, url
        hosts = [hostport.rsplit(":", 1)[0] for hostport in parts.netloc.split(",")]
        assert len(hosts) == 3 and all(host in services for host in hosts), url
        # fxproxy starts only once its Redis is there (merged onto the base's `redis` dependency).
        assert set(services[role]["depends_on"]) & set(services), services[role]["depends_on"]
    command = services["edge"]["command"]
    assert command[command.index("--workers") + 1] == "2", command
    # The base file is untouched by the overrides: the default `docker compose up` is a single Redis.
    for role in ("ingestor", "edge"):
        assert base[role]["environment"]["FXPROXY_REDIS_URL"] == "redis://redis:6379/0"
    assert "--workers" not in base["edge"]["command"]


def test_every_redis_node_of_the_overrides_keeps_the_aof_of_the_single_redis() -> None:
    node = (REDIS_DIR / "cluster-node.conf").read_text(encoding="utf-8").splitlines()
    assert {"appendonly yes", "appendfsync everysec", 'save ""'} <= set(node)
    sentinel = load(REPO_ROOT / "docker-compose.sentinel.yml")["services"]
    for name in ("redis", "redis-replica"):
        argv = sentinel[name]["command"]
        flags = dict(zip(argv[1::2], argv[2::2], strict=False))
        assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec", argv


def test_edges_on_kubernetes_run_one_worker_per_core_they_are_given() -> None:
    deployment = next(d for d in yaml.safe_load_all((REPO_ROOT / "deploy/k8s/edge.yaml").read_text())
                      if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    workers = env["FXPROXY_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert workers == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"], resources
    assert int(resources["limits"]["cpu"]) >= 2, "whole cores, more than one worker"


def test_the_redis_url_comes_from_the_secret_for_every_role_that_uses_redis() -> None:
    k8s = REPO_ROOT / "deploy" / "k8s"
    secret = load(k8s / "secret.example.yaml")
    assert secret["stringData"]["FXPROXY_REDIS_URL"].startswith("redis://redis:6379")
    assert "FXPROXY_REDIS_URL" not in load(k8s / "configmap.yaml")["data"]
    for file in ("edge.yaml", "ingestor.yaml"):
        deployment = next(d for d in yaml.safe_load_all((k8s / file).read_text())
                          if d["kind"] == "Deployment")
        env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        ref = env["FXPROXY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "fxproxy-secrets", "key": "FXPROXY_REDIS_URL"}, file
