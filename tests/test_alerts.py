"""The alert rules (deploy/prometheus/alerts.yml): valid, loaded by the Prometheus config, and firing
as intended on synthetic series (promtool's rule unit tests, deploy/prometheus/alerts.test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_prometheus import prometheus_binary

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def _promtool() -> Path:
    promtool = Path(prometheus_binary()).with_name("promtool")
    if not promtool.exists():
        pytest.skip(f"no promtool beside {prometheus_binary()} (deploy/ci/install-prometheus.sh installs it)")
    return promtool


def test_the_prometheus_config_loads_the_alert_rules() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]


def test_alert_rules_are_valid_and_fire_as_their_unit_tests_say() -> None:
    promtool = _promtool()
    names = {rule["alert"] for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]}
    assert names == {"TierserveTierDown", "TierserveErrorRate", "TierserveDegradedShare", "TierserveLatencyP99",
                     "TierserveExitAgreementBelowTarget"}
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([str(promtool), *command], cwd=PROMETHEUS_DIR, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
