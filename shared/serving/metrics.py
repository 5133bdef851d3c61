"""Prometheus metrics of a tier: base units, the `tierserve_` prefix, low-cardinality labels.

The names below are the public contract (README lists them; tests check the Grafana dashboard
against them). Each tier process owns one registry and serves it on its own HTTP port.
`SPECS` is the one definition: TierMetrics builds its collectors from it, and `metric_names()`
derives every series name from it, so a labelled metric that has no sample yet is still known.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Literal, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from shared.contract.manifest import TIERS
from shared.errors import TierServeError

PREFIX = "tierserve"
OK_OUTCOME = "ok"  # outcome label of a successful RPC (else the status code, lower case)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# gRPC status codes the tiers answer with (shared/errors.py, shared/tier.py): the errors counter
# exports them at 0 from the start, so the first error of a kind shows in rate()
ERROR_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNAVAILABLE",
               "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL")
# the `reason` label of degraded_total: shared.serving.next_tier's failure kinds (HOP_FAILURES, circuit_open) and
# overloaded_early (shared.serving.tier: the opt-in threshold while the next tier is overloaded)
DEGRADED_REASONS = ("unavailable", "deadline", "overloaded", "error", "cancelled", "circuit_open", "overloaded_early")
# the `hop` label of the forwarded_* counters: "<tier>_<next tier>"
HOPS: dict[str, str] = {a: f"{a}_{b}" for a, b in zip(TIERS, TIERS[1:], strict=False)}

Kind = Literal["counter", "gauge", "histogram"]
# The series Prometheus stores for each kind (prometheus_client's *_created series are left out:
# they are timestamps, not something a dashboard should query).
SERIES_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
}


@dataclass(frozen=True)
class MetricSpec:
    attr: str  # the TierMetrics attribute
    kind: Kind
    name: str  # without the kind's suffix (a counter's `_total` is added by the client)
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def series(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in SERIES_SUFFIXES[self.kind])


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "request_duration", "histogram", f"{PREFIX}_request_duration_seconds",
        "Time to answer one RPC at this tier (end to end at mobile, including downstream tiers)",
        ("tier", "outcome"), LATENCY_BUCKETS),
    MetricSpec(
        "own_duration", "histogram", f"{PREFIX}_tier_own_duration_seconds",
        "Time one RPC spent at this tier itself, excluding the wait on the next tier",
        ("tier",), LATENCY_BUCKETS),
    MetricSpec(
        "compute_duration", "histogram", f"{PREFIX}_slice_compute_seconds",
        "onnxruntime time of one slice run (one batch)", ("tier",), LATENCY_BUCKETS),
    MetricSpec(
        "downstream_wait", "histogram", f"{PREFIX}_downstream_wait_seconds",
        "Time spent waiting on the next tier for the forwarded samples of one RPC",
        ("tier",), LATENCY_BUCKETS),
    MetricSpec("exits", "counter", f"{PREFIX}_exits", "Samples answered by this tier's exit",
               ("tier",)),
    MetricSpec("samples", "counter", f"{PREFIX}_samples", "Samples received by this tier",
               ("tier",)),
    MetricSpec("forwarded_samples", "counter", f"{PREFIX}_forwarded_samples",
               "Samples forwarded to the next tier", ("hop",)),
    MetricSpec("forwarded_bytes", "counter", f"{PREFIX}_forwarded_bytes",
               "Tensor payload bytes forwarded to the next tier", ("hop",)),
    MetricSpec(
        "confidence", "histogram", f"{PREFIX}_exit_confidence",
        "Calibrated confidence of every sample at this tier's exit (answered or not)",
        ("tier",), CONFIDENCE_BUCKETS),
    MetricSpec("errors", "counter", f"{PREFIX}_errors",
               "RPCs that ended in an error, by gRPC status code", ("tier", "code")),
    MetricSpec("degraded", "counter", f"{PREFIX}_degraded",
               "Samples answered by this tier's own exit because the next tier failed",
               ("tier", "reason")),
    MetricSpec("inflight", "gauge", f"{PREFIX}_inflight_requests",
               "RPCs being handled by this tier now", ("tier",)),
    MetricSpec("batch_size", "histogram", f"{PREFIX}_batch_size", "Samples per slice run",
               ("tier",), BATCH_BUCKETS),
    MetricSpec("reported_labels", "counter", f"{PREFIX}_reported_labels",
               "True labels reported by clients (ReportLabels) for answers, by the exit that answered", ("exit",)),
    MetricSpec("reported_label_hits", "counter", f"{PREFIX}_reported_label_hits",
               "Reported true labels that the answering exit had given", ("exit",)),
    MetricSpec("exit_threshold", "gauge", f"{PREFIX}_exit_threshold",
               "The confidence threshold of this tier's exit in force (requests may override it)", ("tier",)),
    MetricSpec("audits", "counter", f"{PREFIX}_audits",
               "Early answers of this tier's exit also continued to the final exit (audited)", ("tier",)),
    MetricSpec("audit_agreements", "counter", f"{PREFIX}_audit_agreements",
               "Audited early answers whose label the final exit gave too", ("tier",)),
    MetricSpec("audits_dropped", "counter", f"{PREFIX}_audits_dropped",
               "Audits skipped or refused because a tier was loaded or the audit budget full", ("tier",)),
    MetricSpec("agreement_lower_bound", "gauge", f"{PREFIX}_audit_agreement_lower_bound",
               "Agreement of this exit with the final exit over the recent audits, bounded below with "
               "probability 1 - audit_delta", ("tier",)),
    MetricSpec("agreement_target", "gauge", f"{PREFIX}_audit_agreement_target",
               "The agreement with the final exit this tier's exit should keep (audit alerts compare to it)",
               ("tier",)),
)


def _make(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.doc, spec.labels, buckets=spec.buckets, registry=registry)
    cls = Counter if spec.kind == "counter" else Gauge
    return cls(spec.name, spec.doc, spec.labels, registry=registry)


@dataclass(frozen=True)
class TierSeries:
    """One tier's own labelled series, bound once: labels() costs microseconds a call, and the tier
    loop records about ten series per request."""

    request_ok: Histogram
    own_duration: Histogram
    compute_duration: Histogram
    downstream_wait: Histogram
    exits: Counter
    samples: Counter
    confidence: Histogram
    inflight: Gauge
    batch_size: Histogram
    exit_threshold: Gauge
    audits: Counter
    audit_agreements: Counter
    audits_dropped: Counter
    agreement_lower_bound: Gauge
    agreement_target: Gauge
    forwarded_samples: Counter | None  # None at the last tier
    forwarded_bytes: Counter | None


class TierMetrics:
    """All metrics of one tier, labelled with the tier name where a label is needed; `series`
    holds this tier's own series, bound."""

    request_duration: Histogram
    own_duration: Histogram
    compute_duration: Histogram
    downstream_wait: Histogram
    exits: Counter
    samples: Counter
    forwarded_samples: Counter
    forwarded_bytes: Counter
    confidence: Histogram
    errors: Counter
    degraded: Counter
    inflight: Gauge
    batch_size: Histogram
    exit_threshold: Gauge
    audits: Counter
    audit_agreements: Counter
    audits_dropped: Counter
    agreement_lower_bound: Gauge
    agreement_target: Gauge
    reported_labels: Counter
    reported_label_hits: Counter

    def __init__(self, tier: str, registry: CollectorRegistry | None = None) -> None:
        self.tier = tier
        self.registry = registry or CollectorRegistry()
        if registry is None:  # the process's CPU, memory and file descriptors (process_*), Python's version
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self.hop = HOPS.get(tier)  # None at the last tier
        for spec in SPECS:
            metric = _make(spec, self.registry)
            # series known in advance are exported as 0 from the start, so that rate() and
            # increase() see the first rise instead of a series born with its value
            if spec.labels == ("tier",):
                metric.labels(tier=tier)
            elif spec.labels == ("tier", "outcome"):
                metric.labels(tier=tier, outcome=OK_OUTCOME)
            elif spec.labels == ("hop",) and self.hop:
                metric.labels(hop=self.hop)
            elif spec.labels == ("exit",):
                for exit_tier in TIERS:
                    metric.labels(exit=exit_tier)
            elif spec.labels == ("tier", "code"):
                for code in ERROR_CODES:
                    metric.labels(tier=tier, code=code)
            elif spec.labels == ("tier", "reason") and self.hop:  # the last tier never answers degraded
                for reason in DEGRADED_REASONS:
                    metric.labels(tier=tier, reason=reason)
            setattr(self, spec.attr, metric)
        hop = {"hop": self.hop} if self.hop else None
        own = {attr: getattr(self, attr).labels(tier=tier) for attr in (
            "own_duration", "compute_duration", "downstream_wait", "exits", "samples", "confidence",
            "inflight", "batch_size", "exit_threshold", "audits", "audit_agreements", "audits_dropped",
            "agreement_lower_bound", "agreement_target")}
        self.series = TierSeries(
            request_ok=self.request_duration.labels(tier=tier, outcome=OK_OUTCOME), **own,
            forwarded_samples=self.forwarded_samples.labels(**hop) if hop else None,
            forwarded_bytes=self.forwarded_bytes.labels(**hop) if hop else None)

    def record_call(self, outcome: str, seconds: float) -> None:
        duration = self.series.request_ok if outcome == OK_OUTCOME else self.request_duration.labels(self.tier, outcome)
        duration.observe(seconds)

    def serve(self, port: int, addr: str = "0.0.0.0") -> WSGIServer:
        """Expose /metrics over HTTP on `port` (a daemon thread); other paths are 404, so that a
        probe pointed at the wrong path fails instead of looking healthy. `.shutdown()` stops it."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                return cast(Iterable[bytes], metrics_app(environ, start_response))
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: this is the {self.tier} tier's metrics server; metrics are at /metrics\n".encode()]

        try:
            server = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise TierServeError(f"the {self.tier} tier cannot serve metrics on {addr}:{port}: {exc.strerror} "
                                 "(set metrics_port to a free port, or 0 for no metrics server)") from None
        threading.Thread(target=server.serve_forever, name=f"{self.tier}-metrics", daemon=True).start()
        return server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # no line on stderr per scrape


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def metric_names() -> set[str]:
    """Every series name a tier exports, as Prometheus sees it (_bucket/_count/_sum/_total)."""
    return {series for spec in SPECS for series in spec.series()}


def metrics_table() -> str:
    """The README's metrics table, in markdown."""
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for s in SPECS:
        shown = s.name + ("_total" if s.kind == "counter" else "")
        meaning = s.doc[0].lower() + s.doc[1:] if s.doc[1:2].islower() else s.doc  # "RPCs ..." stays
        rows.append(f"| `{shown}` | {s.kind} | {', '.join(s.labels)} | {meaning} |")
    return "\n".join(rows)
