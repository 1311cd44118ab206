"""The fxproxy settings each shipped container would start with, checked as the process would.

Every fxproxy service of the compose files (an override merged onto docker-compose.yml) and every
fxproxy container of the Kubernetes manifests (envFrom and secretKeyRef resolved from the shipped
ConfigMap and example Secret) gives its arguments and FXPROXY_* environment to the CLI's own
parser and settings loader. A value or flag the process would refuse at start is a problem, and so
is a name no settings model reads: the process only warns of it and keeps the default in force.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fxproxy.cli import _parser
from fxproxy.config import ConfigError, load_settings, unknown_settings
from shared.settings import CommonSettings, EdgeSettings, IngestorSettings, SimfeedSettings

__all__ = ["check_settings"]

MODELS: dict[str, type[CommonSettings]] = {
    "edge": EdgeSettings, "ingestor": IngestorSettings, "simfeed": SimfeedSettings,
}
_K8S_VAR = re.compile(r"\$\((\w+)\)")  # Kubernetes expands $(NAME) in args from the env
_PLACEHOLDER = "pod-0"  # what a fieldRef (the pod's name) gives


@dataclass(frozen=True, slots=True)
class Container:
    where: str  # "docker-compose.yml: edge"
    path: Path
    argv: list[str]  # after the `fxproxy` entrypoint
    env: dict[str, str | None]  # None: set at run time from something not shipped


def check_settings(compose: Sequence[Path], manifests: Sequence[Path]) -> list[tuple[Path, str]]:
    """(file, what is wrong) for each container whose settings the process would refuse or ignore."""
    found: list[tuple[Path, str]] = []
    for container in [*_compose_containers(compose), *_k8s_containers(manifests)]:
        found += [(container.path, f"{container.where}: {why}") for why in _judge(container)]
    return found


def _judge(container: Container) -> list[str]:
    problems = unknown_settings({k: "" for k in container.env}, MODELS.values())
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = _parser().parse_args(container.argv)
    except SystemExit:
        said = stderr.getvalue().strip().splitlines()
        return [*problems, f"`fxproxy {shlex.join(container.argv)}` is refused: {said[-1] if said else '?'}"]
    model = MODELS.get(args.command)
    if model is None:
        return problems
    known = {k: v for k, v in container.env.items() if v is not None and "$" not in v}
    try:
        with _environment(known):
            load_settings(model, args)
    except (ConfigError, ValueError) as exc:
        problems.append(str(exc))
    return problems


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Exactly these FXPROXY_* variables for the duration (settings read os.environ)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("FXPROXY_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


# -- compose ---------------------------------------------------------------------------------------


def _is_fxproxy(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
    return "deploy/Dockerfile" in str(dockerfile) or str(service.get("image", "")).startswith("fxproxy")


def _compose_env(service: Mapping[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (str(item).partition("=") for item in env)
        return {k: (v if sep else None) for k, sep, v in pairs}
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def _compose_containers(files: Sequence[Path]) -> Iterator[Container]:
    base_path = next((p for p in files if p.name == "docker-compose.yml"), None)
    base = _services(base_path) if base_path is not None else {}
    for path in files:
        for name, service in _services(path).items():
            if path != base_path and name in base:  # an override is merged onto the base's service
                env = {**_compose_env(base[name]), **_compose_env(service)}
                service = {**base[name], **service}
            else:
                env = _compose_env(service)
            if not _is_fxproxy(service):
                continue
            command = service.get("command", ["edge"])  # the image's CMD
            argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
            yield Container(f"{path.name}: {name}", path, argv, env)


def _services(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    services = doc.get("services") if isinstance(doc, dict) else None
    return services if isinstance(services, dict) else {}


# -- Kubernetes ------------------------------------------------------------------------------------


def _k8s_containers(files: Sequence[Path]) -> Iterator[Container]:
    docs = [(path, doc) for path in files
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(doc, dict)]
    maps: dict[tuple[str, str], dict[str, str]] = {}
    for _, doc in docs:
        name = str(doc.get("metadata", {}).get("name", ""))
        if doc.get("kind") == "ConfigMap":
            maps["configMap", name] = {str(k): str(v) for k, v in (doc.get("data") or {}).items()}
        elif doc.get("kind") == "Secret":
            data = {str(k): base64.b64decode(str(v)).decode() for k, v in (doc.get("data") or {}).items()}
            data.update({str(k): str(v) for k, v in (doc.get("stringData") or {}).items()})
            maps["secret", name] = data
    for path, doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) if isinstance(spec, dict) else []:
            if not str(container.get("image", "")).startswith("fxproxy"):
                continue
            env = _k8s_env(container, maps)
            command = [str(a) for a in container.get("command", [])]
            argv = command[1:] if command[:1] == ["fxproxy"] else []
            argv += [str(a) for a in container.get("args", ["edge"])]
            argv = [_expand(a, env) for a in argv]
            yield Container(f"{path.name}: {doc.get('metadata', {}).get('name')}/{container.get('name')}",
                            path, argv, env)


def _expand(arg: str, env: Mapping[str, str | None]) -> str:
    return _K8S_VAR.sub(lambda m: env.get(m[1]) or m[0], arg)


def _k8s_env(container: Mapping[str, Any], maps: Mapping[tuple[str, str], dict[str, str]]
             ) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        for kind in ("configMap", "secret"):
            ref = source.get(f"{kind}Ref")
            if ref:
                env.update(maps.get((kind, str(ref.get("name"))), {}))
    for item in container.get("env", []):
        name, value_from = str(item.get("name")), item.get("valueFrom") or {}
        if "value" in item:
            env[name] = str(item["value"])
        elif "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
            kind = "secret" if "secretKeyRef" in value_from else "configMap"
            ref = value_from[f"{kind}KeyRef"]
            env[name] = maps.get((kind, str(ref.get("name"))), {}).get(str(ref.get("key")))
        elif "fieldRef" in value_from:
            env[name] = _PLACEHOLDER
        elif "resourceFieldRef" in value_from:
            env[name] = "2"  # a CPU limit in whole cores (divisor 1)
        else:
            env[name] = None
    return env
