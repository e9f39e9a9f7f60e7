"""The operator's files in deploy/: alert rules valid and unit-tested with promtool, and every metric the
alerts and the Grafana dashboard query is one the services (or Envoy) really export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from chat_service.metrics import ChatMetrics
from embedding_service.metrics import EmbeddingMetrics
from inference_service.metrics import InferenceMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "chatmesh.json"
# Envoy's own, from its admin /stats/prometheus (tests/integration/test_mesh.py reads them off a real one).
ENVOY_METRICS = {
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_membership_healthy",
    "envoy_cluster_membership_total",
}
ENVOY_LABELS = {"envoy_cluster_name", "envoy_response_code_class"}
METRIC = re.compile(r"\b((?:gen_ai|chatmesh|envoy)_[a-z0-9_]+)")


def promtool() -> str:
    found = ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
    if found.is_file():
        return str(found)
    on_path = shutil.which("promtool")
    if on_path is None:
        pytest.fail("promtool is missing: `make install-test` unpacks it into .tools/prometheus")
    return on_path


def registry() -> CollectorRegistry:
    metrics = CollectorRegistry()
    InferenceMetrics(metrics, model="m")
    ChatMetrics(metrics)
    EmbeddingMetrics(metrics)
    return metrics


def labels() -> set[str]:
    """Every label name of those metrics, and Envoy's that the files use."""
    return {
        name for family in registry().collect() for s in family.samples for name in s.labels
    } | ENVOY_LABELS


def exported() -> set[str]:
    """Every sample name the three services' metrics expose."""
    names = set()
    for family in registry().collect():
        names.add(family.name)
        suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
    return names | ENVOY_METRICS


def run(*args: str) -> str:
    done = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_are_valid_and_fire_as_their_unit_tests_say() -> None:
    assert "SUCCESS: 6 rules found" in run("check", "rules", "alerts.yaml")
    assert "SUCCESS" in run("test", "rules", "alerts_test.yaml")


def test_the_scrape_config_is_valid() -> None:
    assert "SUCCESS" in run("check", "config", "--syntax-only", "prometheus.yml")


def test_alerts_and_dashboard_query_only_metrics_that_exist() -> None:
    alerts = (PROMETHEUS / "alerts.yaml").read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = set(METRIC.findall(alerts)) | {name for expr in expressions for name in METRIC.findall(expr)}
    used -= labels()
    assert used, "the files query something"
    assert used <= exported(), f"not exported by any service: {sorted(used - exported())}"
    # Every chatmesh metric is on the dashboard.
    shown = {name for expr in expressions for name in METRIC.findall(expr)} - labels()
    families = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in exported() - ENVOY_METRICS}
    assert families <= {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in shown}
