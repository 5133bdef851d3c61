"""A real Prometheus server (Debian's package) scrapes the three running tiers; what its HTTP query
API reports must agree with the traffic sent: request counts, exits per tier, forwarded samples
and bytes per hop, latency quantiles per tier. Every dashboard expression must evaluate there."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from shared.client import TierClient
from shared.contract.manifest import TIERS, load_manifest
from shared.serving.metrics import HOPS
from shared.tools.processes import TierCluster, free_port
from tests.tiny_model import NEGATIVE, NEUTRAL, POSITIVE

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tierserve.json"
NEVER = 2.0  # a threshold no calibrated confidence reaches
# Grafana's variables, given values Prometheus accepts (the scrape interval is 1s)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "5s"}
# dashboard series that stay empty when nothing fails
MAY_BE_EMPTY = ("tierserve_degraded_total",)


def prometheus_binary() -> str:
    """$TIERSERVE_PROMETHEUS, else prometheus on PATH, else Debian's /usr/bin/prometheus."""
    candidates = [os.environ.get("TIERSERVE_PROMETHEUS"), shutil.which("prometheus"),
                  "/usr/bin/prometheus"]
    for found in candidates:
        if found and os.access(found, os.X_OK):
            return found
    reason = "no prometheus binary: run deploy/ci/install-prometheus.sh (Debian package prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + "; CI installs it, so its absence is an error")
    pytest.skip(reason)


class Prometheus:
    """One Prometheus server on a free loopback port, its storage in a temporary folder."""

    def __init__(self, binary: str, folder: Path, targets: list[str]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "tierserve",
                                "static_configs": [{"targets": targets}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = folder / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in self.query(expr)}

    def wait(self, condition: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                if condition():
                    return
            except (OSError, AssertionError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout:.0f}s\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Traffic:
    """What the client sent and what it was answered."""

    requests: int  # Classify RPCs that succeeded
    failed: int  # Classify RPCs rejected with INVALID_ARGUMENT
    samples: int
    exits: Counter[str]  # answers per answering tier
    reached: Counter[str]  # RPCs that reached each tier


def send_traffic(address: str) -> Traffic:
    words = POSITIVE + NEGATIVE + NEUTRAL
    texts = [" ".join(words[(7 * i + j) % len(words)] for j in range(3 + i % 9)) for i in range(40)]
    # per-request thresholds steer samples to every tier; {} uses the manifest's thresholds
    plan = [({"mobile": NEVER, "edge": NEVER}, 5), ({"mobile": 0.0}, 4),
            ({"mobile": NEVER, "edge": 0.0}, 3), ({}, 8), ({}, 1), ({"mobile": NEVER}, 6),
            ({"mobile": NEVER, "edge": NEVER}, 1)]
    exits: Counter[str] = Counter()
    reached: Counter[str] = Counter()
    sent = 0
    with TierClient(address) as client:
        for thresholds, count in plan:
            answers = client.classify(texts[sent:sent + count], thresholds=thresholds)
            assert len(answers) == count
            sent += count
            tiers = {a.tier for a in answers}
            exits.update(a.tier for a in answers)
            reached.update(t for i, t in enumerate(TIERS) if tiers & set(TIERS[i:]))
        with pytest.raises(grpc.RpcError) as error:
            client.classify([])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return Traffic(len(plan), 1, sent, exits, reached)


@dataclass
class Stack:
    prometheus: Prometheus
    cluster: TierCluster
    traffic: Traffic
    hidden_size: int


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    binary = prometheus_binary()  # skip (or fail on CI) before building the model
    tiny_artifacts: Path = request.getfixturevalue("tiny_artifacts")
    folder = tmp_path_factory.mktemp("prometheus")
    with TierCluster(tiny_artifacts, log_dir=folder / "logs") as cluster:
        targets = [f"127.0.0.1:{cluster.tiers[t].metrics_port}" for t in TIERS]
        prometheus = Prometheus(binary, folder, targets)
        try:
            prometheus.wait(lambda: prometheus.scalar("count(up == 1)") == len(TIERS),
                            "the three tiers are not all scraped")
            traffic = send_traffic(cluster.entry_address)
            sent_by = time.time()
            # a scrape that started after the last answer holds all of the traffic
            prometheus.wait(lambda: prometheus.scalar("min(timestamp(up))") > sent_by + 0.05,
                            "no scrape of every tier after the traffic")
            yield Stack(prometheus, cluster, traffic, load_manifest(tiny_artifacts).hidden_size)
        finally:
            prometheus.stop()


def test_request_counts_equal_the_requests_sent(stack: Stack) -> None:
    p, traffic = stack.prometheus, stack.traffic
    by_outcome = p.by('sum by (outcome) (tierserve_request_duration_seconds_count{tier="mobile"})',
                      "outcome")
    assert by_outcome == {"ok": traffic.requests, "invalid_argument": traffic.failed}
    assert p.by("sum by (code) (tierserve_errors_total) > 0", "code") == {
        "INVALID_ARGUMENT": traffic.failed}
    ok = p.by('sum by (tier) (tierserve_request_duration_seconds_count{outcome="ok"})', "tier")
    assert ok == {t: traffic.reached[t] for t in TIERS}
    assert p.scalar("sum(tierserve_inflight_requests)") == 0


def test_exits_sum_to_the_samples_sent(stack: Stack) -> None:
    p, traffic = stack.prometheus, stack.traffic
    assert p.scalar("sum(tierserve_exits_total)") == traffic.samples
    exits = p.by("sum by (tier) (tierserve_exits_total)", "tier")
    assert exits == {t: traffic.exits[t] for t in TIERS}
    assert all(exits[t] > 0 for t in TIERS), "the traffic plan sends answers to every exit"
    received = p.by("sum by (tier) (tierserve_samples_total)", "tier")
    assert received["mobile"] == traffic.samples
    assert received["edge"] == traffic.samples - exits["mobile"]
    assert received["cloud"] == exits["cloud"]
    confidences = p.by("sum by (tier) (tierserve_exit_confidence_count)", "tier")
    assert confidences == received, "one calibrated confidence per sample at each exit"


def test_forwarded_samples_and_bytes_agree_with_exits(stack: Stack) -> None:
    p = stack.prometheus
    received = p.by("sum by (tier) (tierserve_samples_total)", "tier")
    forwarded = p.by("sum by (hop) (tierserve_forwarded_samples_total)", "hop")
    assert forwarded == {HOPS["mobile"]: received["edge"], HOPS["edge"]: received["cloud"]}
    forwarded_bytes = p.by("sum by (hop) (tierserve_forwarded_bytes_total)", "hop")
    assert set(forwarded_bytes) == set(forwarded)
    for hop, samples in forwarded.items():
        # at least one token's fp32 hidden state per forwarded sample
        assert forwarded_bytes[hop] >= samples * stack.hidden_size * 4


def test_latency_quantiles_per_tier_are_finite_and_positive(stack: Stack) -> None:
    p = stack.prometheus
    for q in (0.5, 0.95, 0.99):
        expr = (f"histogram_quantile({q}, sum by (le, tier) "
                "(rate(tierserve_request_duration_seconds_bucket[1m])))")
        quantiles = p.by(expr, "tier")
        assert set(quantiles) == set(TIERS), expr
        assert all(math.isfinite(v) and v > 0 for v in quantiles.values()), (expr, quantiles)
    compute = p.by("histogram_quantile(0.5, sum by (le, tier) "
                   "(rate(tierserve_slice_compute_seconds_bucket[1m])))", "tier")
    assert all(math.isfinite(v) and v > 0 for v in compute.values()), compute


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [q for p in dashboard["panels"] for q in [p, *p.get("panels", [])]]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_every_dashboard_expression_evaluates_to_data(stack: Stack) -> None:
    p = stack.prometheus
    empty = []
    for expr in dashboard_exprs():
        concrete = expr
        for variable, value in GRAFANA_VARIABLES.items():
            concrete = concrete.replace(variable, value)
        result = p.query(concrete)  # a PromQL syntax error fails here
        if not result and not any(name in expr for name in MAY_BE_EMPTY):
            empty.append(expr)
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)


def test_compose_health_probe_accepts_the_running_tiers(stack: Stack) -> None:
    probe = ROOT / "deploy" / "healthcheck.py"
    for tier in stack.cluster.tiers.values():
        done = subprocess.run([sys.executable, str(probe), tier.address], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "SERVING" in done.stdout


def test_compose_prometheus_config_passes_promtool() -> None:
    promtool = Path(prometheus_binary()).with_name("promtool")
    if not promtool.exists():
        pytest.skip(f"no promtool beside {prometheus_binary()}")
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    done = subprocess.run([str(promtool), "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
