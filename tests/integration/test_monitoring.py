"""The operator kit in deploy/monitoring/ refers only to metrics that exist, and its rules are valid.

Every `fxproxy_*` series the Grafana dashboard's queries and the Prometheus
alert rules use must be exposed by a real edge or ingestor (started here
through the CLI against the session's redis-server), with the labels the
selectors match on. `promtool` (Debian's `prometheus` package, installed when
missing; never skipped) checks the rules and the scrape config, and must
reject a broken copy of the rules.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import API_KEY, Cluster
from tests.support.client import open_native
from tests.support.ports import free_port
from tests.support.procs import wait_http
from tests.support.promtool import run_promtool

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "fxproxy.json"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
COMPOSE = REPO_ROOT / "docker-compose.yml"

_METRIC = re.compile(r"\bfxproxy_[a-z_]+")
# `name{label="v", other=~"x"}`: the selector's label names.
_SELECTOR = re.compile(r"\b(fxproxy_[a-z_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels Prometheus adds when it scrapes, or that histogram buckets carry.
_TARGET_LABELS = {"job", "instance", "le"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)")


# -- parsing ---------------------------------------------------------------------------------------


def exposed_series(text: str) -> dict[str, set[str]]:
    """The series names a /metrics page exposes, each with the label names its samples carry.

    From samples, and from `# TYPE` lines too: a labelled counter nobody has
    incremented yet has no sample but is still scraped once it is. A counter
    is exposed as NAME_total, a histogram as NAME_bucket, NAME_sum and
    NAME_count (never bare NAME), a gauge as NAME.
    """
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        typed = _TYPE.match(line)
        if typed:
            name, kind = typed.groups()
            if kind == "counter":
                names = [name if name.endswith("_total") else f"{name}_total"]
            elif kind in ("histogram", "summary"):
                names = [f"{name}_sum", f"{name}_count"] + ([f"{name}_bucket"] if kind == "histogram" else [])
            else:
                names = [name]
            for n in names:
                series.setdefault(n, set())
            continue
        if line.startswith("#"):
            continue
        sample = _SAMPLE.match(line)
        if sample:
            labels = {m.group(1) for m in _MATCHER.finditer(sample.group(2) or "")}
            series.setdefault(sample.group(1), set()).update(labels)
    return series


def referenced(expressions: list[str]) -> tuple[set[str], dict[str, set[str]]]:
    """fxproxy_* names used in PromQL expressions, and the label names their selectors match on."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for expr in expressions:
        names.update(_METRIC.findall(expr))
        for selector in _SELECTOR.finditer(expr):
            used = {m.group(1) for m in _MATCHER.finditer(selector.group(2))} - _TARGET_LABELS
            labels.setdefault(selector.group(1), set()).update(used)
    return names, labels


def missing(expressions: list[str], series: dict[str, set[str]]) -> list[str]:
    """What the expressions use that the exposition does not have: names, then name{label}."""
    names, labels = referenced(expressions)
    problems = sorted(n for n in names if n not in series)
    for name, used in sorted(labels.items()):
        if name in series:
            problems += [f"{name}{{{label}}}" for label in sorted(used - series[name])]
    return problems


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL string of the dashboard: panel targets and templating queries."""
    found: list[str] = []
    for node in _walk(dashboard):
        for key in ("expr", "definition"):
            if isinstance(node.get(key), str):
                found.append(node[key])
        query = node.get("query")
        if isinstance(query, str) and node.get("type") == "query":
            found.append(query)
    return found


def rule_expressions(text: str) -> list[str]:
    """The `expr:` of every rule in a rules file (one line, or a `|`/`>` block)."""
    found: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value[:1] in ("|", ">"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(block)
        found.append(value)
    return found


# -- unit: the check itself bites ------------------------------------------------------------------

_SYNTHETIC = """\
# HELP fxproxy_edge_deliveries_total Tick frames queued to clients
# TYPE fxproxy_edge_deliveries_total counter
fxproxy_edge_deliveries_total 3.0
# TYPE fxproxy_edge_closed_total counter
fxproxy_edge_closed_total{code="1000"} 1.0
# TYPE fxproxy_edge_client_errors_total counter
# TYPE fxproxy_edge_client_lag_seconds histogram
fxproxy_edge_client_lag_seconds_bucket{le="+Inf"} 0.0
fxproxy_edge_client_lag_seconds_count 0.0
fxproxy_edge_client_lag_seconds_sum 0.0
# TYPE fxproxy_edge_bus_connected gauge
fxproxy_edge_bus_connected 1.0
"""


@pytest.mark.parametrize("good", [
    "rate(fxproxy_edge_deliveries_total[5m])",
    'sum by (code) (rate(fxproxy_edge_closed_total{code="1013", instance=~"$edge"}[1m]))',
    "sum by (code) (rate(fxproxy_edge_client_errors_total[1m]))",  # no sample yet, declared
    "histogram_quantile(0.99, sum by (le) (rate(fxproxy_edge_client_lag_seconds_bucket[5m])))",
    "fxproxy_edge_client_lag_seconds_sum / fxproxy_edge_client_lag_seconds_count",
    "fxproxy_edge_bus_connected == 0",
])
def test_the_metric_check_accepts_real_series(good: str) -> None:
    assert missing([good], exposed_series(_SYNTHETIC)) == []


@pytest.mark.parametrize(("bad", "reported"), [
    ("rate(fxproxy_edge_delivereis_total[5m])", "fxproxy_edge_delivereis_total"),  # typo
    ("rate(fxproxy_edge_deliveries[5m])", "fxproxy_edge_deliveries"),  # counter without _total
    ("fxproxy_edge_client_lag_seconds > 1", "fxproxy_edge_client_lag_seconds"),  # bare histogram
    ("rate(fxproxy_edge_bus_connected_bucket[5m])", "fxproxy_edge_bus_connected_bucket"),  # not a histogram
    ('rate(fxproxy_edge_closed_total{reason="x"}[1m])', "fxproxy_edge_closed_total{reason}"),  # wrong label
])
def test_the_metric_check_reports_a_name_that_does_not_exist(bad: str, reported: str) -> None:
    assert missing([bad], exposed_series(_SYNTHETIC)) == [reported]


def test_expressions_are_read_from_both_files() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    from_dashboard = dashboard_expressions(dashboard)
    from_rules = rule_expressions(ALERTS.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len(from_dashboard) >= len(panels) > 10
    assert len(from_rules) == ALERTS.read_text(encoding="utf-8").count("- alert:") >= 8
    assert rule_expressions("    - alert: A\n      expr: |\n        sum(fxproxy_a_total)\n          > 0\n"
                            "      for: 1m\n") == ["sum(fxproxy_a_total) > 0"]


# -- the real processes ----------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


async def test_every_metric_the_dashboard_and_alerts_use_is_exposed(cluster: Cluster) -> None:
    cluster.simfeed()
    metrics_port = free_port()
    cluster.ingestor(FXPROXY_METRICS_HOST="127.0.0.1", FXPROXY_METRICS_PORT=str(metrics_port))
    _, edge_port = cluster.edge()
    # Ready = leader with its upstream connected and Redis answering.
    wait_http(f"http://127.0.0.1:{metrics_port}/readyz", timeout=15)
    # Give the labelled counters a sample each, so their label names can be checked too.
    with pytest.raises(InvalidStatus):
        await open_native(edge_port, "not-a-key")
    ws = await open_native(edge_port, API_KEY)
    await ws.close()
    deadline = time.monotonic() + 5
    while True:  # the edge counts the close when it sees the socket end
        edge = exposed_series(_get(f"http://127.0.0.1:{edge_port}/metrics"))
        if edge.get("fxproxy_edge_closed_total") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    ingestor = exposed_series(_get(f"http://127.0.0.1:{metrics_port}/metrics"))
    assert "fxproxy_edge_connections" in edge and "fxproxy_ingestor_leader" in ingestor
    assert "reason" in edge["fxproxy_edge_handshakes_rejected_total"]
    assert "code" in edge["fxproxy_edge_closed_total"]
    series = {**ingestor, **edge}

    dashboard = dashboard_expressions(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    rules = rule_expressions(ALERTS.read_text(encoding="utf-8"))
    assert missing(dashboard, series) == [], f"{DASHBOARD} uses metrics no process exposes"
    assert missing(rules, series) == [], f"{ALERTS} uses metrics no process exposes"


# -- promtool --------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    done = run_promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_accepts_the_scrape_config_with_its_rules(tmp_path: Path) -> None:
    # Offline: the rules path is relative to the config file, and DNS
    # discovery is only parsed, not resolved. Run from elsewhere to prove it.
    done = run_promtool("check", "config", str(PROMETHEUS_CONFIG), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


@pytest.mark.parametrize(("what", "breakage"), [
    ("bad PromQL", ("expr: increase(fxproxy_edge_gaps_unrecoverable_total[5m]) > 0",
                    "expr: increase(fxproxy_edge_gaps_unrecoverable_total[5m] > 0")),
    ("bad duration", ("for: 30s", "for: thirty seconds")),
    ("bad template", ("{{ $labels.instance }} cannot reach Redis", "{{ $labels.instance cannot reach Redis")),
])
def test_promtool_rejects_a_broken_copy_of_the_rules(tmp_path: Path, what: str,
                                                      breakage: tuple[str, str]) -> None:
    text = ALERTS.read_text(encoding="utf-8")
    old, new = breakage
    assert old in text, f"the rules no longer contain {old!r}: update this test"
    broken = tmp_path / "alerts.yml"
    broken.write_text(text.replace(old, new, 1), encoding="utf-8")
    done = run_promtool("check", "rules", str(broken))
    assert done.returncode != 0, f"promtool accepted rules with {what}:\n{done.stdout}"


# -- compose profile -------------------------------------------------------------------------------


def test_the_compose_profile_mounts_files_that_exist() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for service in ("prometheus", "grafana"):
        block = re.search(rf"^  {service}:\n((?:    .*\n|\n)+)", text, re.MULTILINE)
        assert block, f"no {service} service in {COMPOSE}"
        assert 'profiles: ["monitoring"]' in block.group(1)
    mounts = re.findall(r"^\s*- \./(deploy/monitoring/[^:]+):", text, re.MULTILINE)
    assert len(mounts) == 3
    for mount in mounts:
        assert (REPO_ROOT / mount).exists(), mount
    provisioning = MONITORING / "grafana" / "provisioning"
    datasource = (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    assert "uid: prometheus" in datasource and "url: http://prometheus:9090" in datasource
    assert "path: /var/lib/grafana/dashboards" in (provisioning / "dashboards" / "fxproxy.yml").read_text()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["current"]["value"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
