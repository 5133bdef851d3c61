"""Audits (shared.serving.audit): early answers also continued to the final exit in the background,
their agreement with it counted and bounded; never changing or delaying an answer, dropped first
under load. Unit tests on the Auditor, and real tiers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.common import scrape
from shared.client import TierClient
from shared.contract.bounds import clopper_pearson_lower
from shared.contract.manifest import load_manifest
from shared.serving.audit import AUDIT_METADATA, FINAL_EXIT_ONLY, Auditor, EarlyExit
from shared.serving.metrics import TierMetrics
from shared.tools.processes import running_tiers
from shared.wire.codec import to_tensor
from shared.wire.rpc import pb2, pb2_grpc
from tests.tiny_model import sentence

_rng = np.random.default_rng(3)
TEXTS = [sentence(_rng, i % 2, 3) for i in range(40)]
AT_MOBILE = {"mobile": 0.0}


def _series(metrics: TierMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"tier": metrics.tier}) or 0.0


def test_the_auditor_counts_agreement_and_bounds_it_over_its_window() -> None:
    metrics = TierMetrics("mobile")

    async def never(*args: object, **kwargs: object) -> list[pb2.Answer]:
        raise AssertionError("not called")

    auditor = Auditor("mobile", metrics, never, fraction=1.0, budget=100, window=50, delta=0.1)
    assert auditor.lower_bound() == 0.0
    auditor.record([True] * 40 + [False] * 10)
    auditor.record([True] * 10)  # the window keeps the last 50: 40 agree
    assert _series(metrics, "tierserve_audits_total") == 60
    assert _series(metrics, "tierserve_audit_agreements_total") == 50
    assert auditor.lower_bound() == pytest.approx(clopper_pearson_lower(40, 50, 0.1))
    assert _series(metrics, "tierserve_audit_agreement_lower_bound") == pytest.approx(auditor.lower_bound())


def test_audits_are_picked_by_fraction_and_skipped_when_the_budget_or_the_tier_is_full() -> None:
    metrics = TierMetrics("edge")

    async def never(*args: object, **kwargs: object) -> list[pb2.Answer]:
        raise AssertionError("not called")

    auditor = Auditor("edge", metrics, never, fraction=0.25, budget=8, rng=random.Random(0))
    picked, seen = 0, 0
    for _ in range(1000):
        picked += len(auditor.pick(list(range(4)), load=0.0))
        seen += 4
        assert picked <= 0.25 * seen  # at most the fraction at every point, not only on average
    assert picked > 950  # and close to it: a quarter of 4,000
    auditor.fraction = 1.0
    assert auditor.pick([0, 1, 2], load=0.6) == []  # the tier is more than half full
    auditor.inflight = 7
    assert auditor.pick([0, 1], load=0.0) == []  # 7 + 2 > 8
    assert _series(metrics, "tierserve_audits_dropped_total") == 5


def test_a_failed_audit_is_dropped_not_counted() -> None:
    metrics = TierMetrics("mobile")

    async def refuse(*args: object, **kwargs: object) -> list[pb2.Answer]:
        assert args[2] == FINAL_EXIT_ONLY and kwargs == {"audit": True}
        raise RuntimeError("refused")

    async def scenario() -> None:
        auditor = Auditor("mobile", metrics, refuse, fraction=1.0, budget=8)
        auditor.start({}, ["a/0", "a/1"], [EarlyExit(0, 0.9, True), EarlyExit(1, 0.6, False)])
        await asyncio.sleep(0.05)
        assert auditor.inflight == 0

    asyncio.run(scenario())
    assert _series(metrics, "tierserve_audits_dropped_total") == 2 and _series(metrics, "tierserve_audits_total") == 0


def test_audits_never_change_or_delay_the_answer(tiny_artifacts: Path, tmp_path: Path) -> None:
    """Every mobile answer audited, the cloud slow: answers come at the mobile exit's speed, the
    same as without audits, and the audits are counted once the cloud has answered them."""
    flags = {"mobile": {"audit_fraction": 1.0, "audit_budget_samples": 64}, "cloud": {"inject_delay_ms": 600}}
    with running_tiers(tiny_artifacts, flags=flags, log_dir=tmp_path / "audited") as audited, \
            TierClient(audited.entry_address) as client:
        started = time.monotonic()
        answers = client.classify(TEXTS[:8], AT_MOBILE)
        waited = time.monotonic() - started
        mobile = audited.tiers["mobile"].metrics_port
        deadline = time.monotonic() + 10
        while scrape(mobile)[("tierserve_audits_total", (("tier", "mobile"),))] < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        samples = scrape(mobile)
    with running_tiers(tiny_artifacts, log_dir=tmp_path / "plain") as plain, TierClient(plain.entry_address) as other:
        expected = other.classify(TEXTS[:8], AT_MOBILE)
    assert waited < 0.5, f"{waited:.2f} s: the answer waited on the audits"
    assert [(a.tier, a.label, a.degraded) for a in answers] == [(a.tier, a.label, a.degraded) for a in expected]
    np.testing.assert_allclose([list(a.probabilities) for a in answers], [list(a.probabilities) for a in expected])
    assert samples[("tierserve_audits_total", (("tier", "mobile"),))] == 8
    agreeing = samples[("tierserve_audit_agreements_total", (("tier", "mobile"),))]
    assert 0 <= agreeing <= 8
    assert samples[("tierserve_audit_agreement_lower_bound", (("tier", "mobile"),))] == pytest.approx(
        clopper_pearson_lower(int(agreeing), 8, 0.1))
    assert samples[("tierserve_audit_agreement_target", (("tier", "mobile"),))] == 0.9


def test_a_loaded_tier_drops_audits_first(tiny_artifacts: Path, tmp_path: Path) -> None:
    """An edge more than half full refuses an audit at once, and still takes a real call."""
    flags = {"edge": {"inject_delay_ms": 1500, "max_inflight_samples": 4, "max_batch": 4}}
    hidden = load_manifest(tiny_artifacts).hidden_size
    request = pb2.ContinueRequest(tensors={"hidden": to_tensor(np.zeros((1, 3, hidden), np.float32)),
                                           "attention_mask": to_tensor(np.ones((1, 3), np.int64))},
                                  request_ids=["x/0"], thresholds=FINAL_EXIT_ONLY)
    with running_tiers(tiny_artifacts, flags=flags, log_dir=tmp_path) as cluster, \
            grpc.insecure_channel(cluster.tiers["edge"].address) as channel:
        call = pb2_grpc.ContinuationStub(channel).Continue
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(call, request, timeout=10) for _ in range(3)]  # 3 of 4 samples
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=10, metadata=(AUDIT_METADATA,))
            real = pool.submit(call, request, timeout=10)
            answers = [f.result() for f in [*busy, real]]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "drops audits first" in refused.value.details()
    assert all(a.answers[0].tier == "cloud" for a in answers)
