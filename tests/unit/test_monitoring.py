"""The monitoring kit in deploy/monitoring (issue 15 item 2): the alert rules load and
pass their `promtool test rules` tests, and the rules and the Grafana dashboard only
query metrics the daemons export, in PromQL that parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import cdp_coordinator.daemon
import cdp_filter.metrics
import cdp_proxy.metrics
import cdp_target.metrics

pytestmark = pytest.mark.timeout(60)

KIT = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing (Debian "
                                    "package prometheus; scripts/bootstrap.sh installs it)")
METRIC = re.compile(r"\b(cdp_[a-z0-9_]+|up)\b")
_ = (cdp_coordinator.daemon, cdp_filter.metrics, cdp_proxy.metrics, cdp_target.metrics)


def exported() -> set[str]:
    """Every sample name the daemons' metrics can produce."""
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total", "_created"),
                    "histogram": ("_bucket", "_sum", "_count", "_created")}
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((KIT / "cdp-alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads((KIT / "cdp-dashboard.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


@needs_promtool
def test_rules_load_and_their_tests_pass() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", "cdp-alerts.yml"], cwd=KIT,
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "cdp-alerts.test.yml"], cwd=KIT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_has_a_firing_test() -> None:
    tests = yaml.safe_load((KIT / "cdp-alerts.test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert {str(r["alert"]) for r in rules()} == fired


def test_rules_and_dashboard_query_only_exported_metrics() -> None:
    have = exported() | {"up"}
    used = {m for r in rules() for m in METRIC.findall(str(r["expr"]))}
    used |= {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert used, "no metric found in the rules or the dashboard"
    assert used - have == set(), f"not exported by any daemon: {sorted(used - have)}"


def test_dashboard_structure() -> None:
    doc = json.loads((KIT / "cdp-dashboard.json").read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "policy"} <= variables
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for needed in ("rpo lag", "bytes/s", "journal", "restore points", "undo", "gaps", "proxy"):
        assert needed in titles, needed


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Each query as a recording rule: `promtool check rules` parses its PromQL."""
    assert PROMTOOL is not None
    rec = [{"record": f"cdp_dashboard:q{i}", "expr": e.replace("$policy", ".*")}
           for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rec}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                           text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
