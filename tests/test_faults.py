"""Tier failures: degraded answers, retries, the circuit breaker, deadlines, the in-flight limit.

The pure parts (backoff, breaker, GuardedNextTier's decisions) are tested in-process; the rest on
real tiers on 127.0.0.1, one of them killed, stopped or slowed (settings.inject_delay_ms).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from shared.client import TierClient
from shared.contract.manifest import load_manifest
from shared.serving.next_tier import CircuitBreaker, GuardedNextTier, NextTierError, RetryPolicy
from shared.tools.loadgen import FaultPlan, drive
from shared.tools.processes import TierCluster, running_tiers
from shared.wire.codec import to_tensor
from shared.wire.rpc import pb2, pb2_grpc
from tests.tiny_model import sentence

TO_THE_CLOUD = {"mobile": 1.01, "edge": 1.01}  # every sample goes through all three tiers
_rng = np.random.default_rng(3)
TEXTS = [sentence(_rng, i % 2, 2) for i in range(64)]


# --- pure parts ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_n_failures_and_half_opens_for_one_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown=0.5, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 0.5
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow(), "one probe at a time"
    breaker.failure()  # the probe failed: open again, for a whole cool-down
    assert breaker.state == "open" and breaker.retry_in() == pytest.approx(0.5)
    clock.now += 0.5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0


def test_a_cancelled_probe_lets_the_next_one_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=0.1, clock=clock)
    breaker.failure()
    clock.now += 0.2
    assert breaker.allow()
    breaker.release()
    assert breaker.allow()


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05)
    for retry, ceiling in enumerate([0.01, 0.02, 0.04, 0.05, 0.05]):
        delays = [policy.delay(retry) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling / 2


class ScriptedNextTier:
    """Fails with the given statuses, then answers; records the timeouts it was given."""

    def __init__(self, failures: Sequence[str]) -> None:
        self.failures = list(failures)
        self.timeouts: list[float | None] = []

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                             ) -> list[pb2.Answer]:
        self.timeouts.append(timeout)
        if self.failures:
            status = self.failures.pop(0)
            raise NextTierError(f"scripted {status}", status)
        return [pb2.Answer(request_id=i) for i in request_ids]

    async def close(self) -> None: ...


def _guarded(failures: Sequence[str], attempts: int = 3) -> tuple[GuardedNextTier, ScriptedNextTier]:
    scripted = ScriptedNextTier(failures)
    return GuardedNextTier(scripted, "edge", RetryPolicy(attempts, 0.001, 0.002), CircuitBreaker(10)), scripted


def test_unavailable_is_retried_within_the_deadline() -> None:
    guarded, scripted = _guarded(["UNAVAILABLE", "UNAVAILABLE"])
    answers = asyncio.run(guarded.continue_batch({}, ["a"], {}, 1.0))
    assert [a.request_id for a in answers] == ["a"]
    assert len(scripted.timeouts) == 3
    assert all(t is not None and t <= 1.0 for t in scripted.timeouts)
    assert scripted.timeouts == sorted(scripted.timeouts, reverse=True), "each retry gets what is left"


@pytest.mark.parametrize(("status", "kind"), [("DEADLINE_EXCEEDED", "deadline"),
                                              ("RESOURCE_EXHAUSTED", "overloaded"), ("INTERNAL", "error")])
def test_other_failures_are_not_retried(status: str, kind: str) -> None:
    guarded, scripted = _guarded([status])
    with pytest.raises(NextTierError) as caught:
        asyncio.run(guarded.continue_batch({}, ["a"], {}, 1.0))
    assert caught.value.kind == kind and str(caught.value).startswith("edge ")
    assert len(scripted.timeouts) == 1


def test_no_retry_when_the_deadline_leaves_no_time() -> None:
    guarded, scripted = _guarded(["UNAVAILABLE"] * 3)
    guarded.retry = RetryPolicy(3, base_delay=0.5, max_delay=0.5)
    started = time.monotonic()
    with pytest.raises(NextTierError, match="edge unavailable"):
        asyncio.run(guarded.continue_batch({}, ["a"], {}, 0.004))
    assert time.monotonic() - started < 0.3
    assert len(scripted.timeouts) in (1, 2)  # a retry only if its jittered pause fitted


# --- real tiers ---------------------------------------------------------------------------------

def _metric(cluster: TierCluster, tier: str, series: str) -> float:
    url = f"http://127.0.0.1:{cluster.tiers[tier].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


@pytest.fixture
def cluster(tiny_artifacts: Path) -> Iterator[TierCluster]:
    with running_tiers(tiny_artifacts) as started:
        yield started


def test_killing_the_edge_mid_run_loses_no_request_and_forwarding_resumes(cluster: TierCluster) -> None:
    fault = FaultPlan("edge", kill_after=60, down_seconds=0.5, tail_requests=100)
    result = asyncio.run(drive(cluster.entry_address, TEXTS, 400, 8, deadline=5.0, thresholds=TO_THE_CLOUD,
                               cluster=cluster, fault=fault, rate=100))
    summary = result.summary()
    assert summary["failed"] == 0, summary
    assert summary["answered"] == summary["requests"] >= 400
    assert summary["degraded"] > 0, "the edge was down for a while"
    resumed = summary["resume_after_serving_s"]
    assert resumed is not None and resumed < 2.0, summary
    degraded = [r for r in result.records if r.outcome == "degraded"]
    assert all(reason.startswith("edge ") for r in degraded for reason in r.reasons)
    assert result.events.serving_at is not None
    resumed_at = result.events.serving_at + resumed
    after = [r for r in result.records if r.started > resumed_at]
    assert after and all(r.outcome == "full" for r in after), "forwarding resumed for good"
    assert _metric(cluster, "mobile", 'tierserve_degraded_total{reason="circuit_open",tier="mobile"}') > 0


def test_killing_the_cloud_is_answered_by_the_edge_degraded(cluster: TierCluster) -> None:
    fault = FaultPlan("cloud", kill_after=40, down_seconds=0.5, tail_requests=100)
    result = asyncio.run(drive(cluster.entry_address, TEXTS, 300, 8, deadline=5.0, thresholds=TO_THE_CLOUD,
                               cluster=cluster, fault=fault, rate=100))
    summary = result.summary()
    assert summary["failed"] == 0 and summary["answered"] == summary["requests"] >= 300, summary
    assert summary["degraded"] > 0
    assert summary["resume_after_serving_s"] is not None and summary["resume_after_serving_s"] < 2.0
    assert all(reason.startswith("cloud ") for r in result.records for reason in r.reasons)


def test_the_breaker_opens_on_a_dead_edge_and_closes_when_it_is_back(cluster: TierCluster) -> None:
    cluster.tiers["edge"].stop()
    with TierClient(cluster.entry_address, timeout=5) as client:
        reasons = []
        for _ in range(8):
            [answer] = client.classify(["a good film"], thresholds=TO_THE_CLOUD)
            assert answer.degraded and answer.tier == "mobile"
            reasons.append(answer.degraded_reason)
        assert reasons[0].startswith("edge unavailable (after 3 attempts)")
        assert "Connection refused" in reasons[0] or "connect" in reasons[0]
        assert reasons[-1].startswith("edge circuit open after")
        cluster.restart("edge")
        back = time.monotonic()
        while True:
            [answer] = client.classify(["a good film"], thresholds=TO_THE_CLOUD)
            if not answer.degraded:
                break
            assert time.monotonic() - back < 2.0, "forwarding did not resume within 2 s"
            time.sleep(0.02)
        assert answer.tier == "cloud"


@pytest.fixture(scope="module")
def slow_cluster(tiny_artifacts: Path) -> Iterator[TierCluster]:
    """The cloud takes 1 s to answer Continue and takes at most 2 samples at once."""
    flags = {"cloud": {"inject_delay_ms": 1000, "max_inflight_samples": 2, "max_batch": 2}}
    with running_tiers(tiny_artifacts, flags=flags) as started:
        yield started


def test_a_slow_next_tier_and_a_short_deadline_give_degraded_answers_in_time(slow_cluster: TierCluster) -> None:
    with TierClient(slow_cluster.entry_address) as client:
        for _ in range(5):
            started = time.monotonic()
            answers = client.classify(["a good film", "bad plot"], thresholds=TO_THE_CLOUD, timeout=0.3)
            elapsed = time.monotonic() - started
            assert elapsed < 0.3
            # the edge gave up on the cloud in time to answer itself, before the mobile's own cut-off
            assert [a.tier for a in answers] == ["edge", "edge"]
            assert all(a.degraded and a.degraded_reason.startswith("cloud ") for a in answers)
    assert _metric(slow_cluster, "edge", 'tierserve_degraded_total{reason="deadline",tier="edge"}') > 0


def test_beyond_its_samples_in_flight_a_tier_answers_resource_exhausted_at_once(
        slow_cluster: TierCluster, tiny_artifacts: Path) -> None:
    hidden = load_manifest(tiny_artifacts).hidden_size
    request = pb2.ContinueRequest(
        tensors={"hidden": to_tensor(np.zeros((1, 3, hidden), np.float32)),
                 "attention_mask": to_tensor(np.ones((1, 3), np.int64))},
        request_ids=["x/0"])  # each call takes ~1 s at the slow cloud

    def call(_: int) -> tuple[grpc.StatusCode, str, float]:
        started = time.monotonic()
        with grpc.insecure_channel(slow_cluster.tiers["cloud"].address) as channel:
            try:
                pb2_grpc.ContinuationStub(channel).Continue(request, timeout=5)
                return grpc.StatusCode.OK, "", time.monotonic() - started
            except grpc.RpcError as exc:
                return exc.code(), exc.details(), time.monotonic() - started

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused and sum(r[0] == grpc.StatusCode.OK for r in results) >= 2, results
    assert all("limit of 2 samples in flight" in details for _, details, _ in refused)
    assert min(seconds for _, _, seconds in refused) < 0.5, "refused at once, not queued"
