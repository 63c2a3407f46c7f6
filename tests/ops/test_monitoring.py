"""The monitoring files in deploy/monitoring: alert rules pass promtool, every alert has a
runbook entry, and the Grafana dashboard is well formed. (That every metric they name
exists is checked against the running services in the end-to-end health test.)"""

import json
import pathlib
import re
import subprocess

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
RUNBOOK = ROOT / "docs" / "operations.md"


def test_alert_rules_pass_promtool():
    out = subprocess.run(["promtool", "check", "rules", ALERTS], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_runbook_section():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    headings = {h.strip().lower() for h in re.findall(r"^### (.+)$", RUNBOOK.read_text(), re.M)}
    for rule in rules:
        assert rule["alert"].lower() in headings, f"{rule['alert']} has no section in docs/operations.md"
        assert rule["annotations"]["runbook"].endswith("#" + rule["alert"].lower())


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
