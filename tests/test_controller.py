"""The threshold controller (shared.serving.controller) on constructed streams whose answer is known:
it converges, follows a shift, never passes its bounds or its step, and logs every change; and an
auditing tier feeds it from real tiers on 127.0.0.1."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from bench.common import scrape
from shared.client import TierClient
from shared.serving.controller import ThresholdController
from shared.serving.metrics import TierMetrics
from shared.tools.processes import running_tiers
from tests.tiny_model import sentence


def stream(rng: np.random.Generator, n: int, knee: float, below: float) -> list[tuple[float, bool]]:
    """Confidences uniform in [0.5, 1]; a sample agrees with the final exit with probability 0.99 at
    or above `knee`, `below` under it: with a target of 0.95 the answer is near the knee."""
    confidence = rng.uniform(0.5, 1.0, n)
    agrees = rng.random(n) < np.where(confidence >= knee, 0.99, below)
    return list(zip(confidence.tolist(), agrees.tolist(), strict=True))


def _controller(threshold: float = 0.9, **kwargs: object) -> ThresholdController:
    settings: dict = {"target": 0.95, "delta": 0.1, "floor": 0.55, "ceiling": 0.99, "max_raise": 0.05,
                      "max_lower": 0.02,
                      "every": 100, "window": 2000, "min_samples": 300, **kwargs}
    return ThresholdController("mobile", TierMetrics("mobile"), threshold, **settings)


def test_it_converges_near_the_known_answer_in_bounded_steps() -> None:
    controller = _controller(threshold=0.95)
    seen = [controller.threshold]
    for confidence, agrees in stream(np.random.default_rng(0), 6000, knee=0.75, below=0.6):
        controller.observe(confidence, agrees)
        seen.append(controller.threshold)
    moves = np.diff(seen)
    assert moves.min() >= -0.02 - 1e-12 and moves.max() <= 0.05 + 1e-12
    assert 0.7 <= controller.threshold <= 0.82, controller.threshold  # the knee, give or take the bound's margin
    window = np.array(controller.window)
    exiting = window[window[:, 0] >= controller.threshold]
    assert exiting[:, 1].mean() >= 0.95  # the exit's agreement at the threshold it settled on


def test_after_a_shift_it_raises_the_threshold_and_it_stays_within_its_bounds() -> None:
    rng = np.random.default_rng(1)
    controller = _controller(threshold=0.7)
    for confidence, agrees in stream(rng, 3000, knee=0.7, below=0.6):
        controller.observe(confidence, agrees)
    before = controller.threshold
    for confidence, agrees in stream(rng, 6000, knee=0.9, below=0.6):  # drift: agreement only above 0.9
        controller.observe(confidence, agrees)
    assert controller.threshold > before + 0.1
    assert 0.85 <= controller.threshold <= 0.99
    for confidence, agrees in stream(rng, 6000, knee=2.0, below=0.3):  # nothing agrees: the ceiling holds
        controller.observe(confidence, agrees)
    assert controller.threshold == 0.99
    for confidence, _ in stream(rng, 6000, knee=0.5, below=0.5):  # everything agrees: the floor holds
        controller.observe(confidence, True)
    assert controller.threshold == 0.55


def test_it_rises_by_max_raise_and_falls_by_max_lower() -> None:
    """A stream nothing agrees on drives it up, one on which everything agrees down: each update
    moves by the full step of its direction, until the bound."""
    rising = _controller(threshold=0.6, every=100, min_samples=100)
    seen = [rising.threshold]
    for confidence, agrees in stream(np.random.default_rng(5), 400, knee=2.0, below=0.0):
        rising.observe(confidence, agrees)
        seen.append(rising.threshold)
    assert sorted(set(np.round(np.diff(seen), 9))) == [0.0, 0.05]
    assert rising.threshold == pytest.approx(0.8)  # four updates of 0.05 from 0.6
    falling = _controller(threshold=0.9, every=100, min_samples=200)  # fewer certify nothing: it would rise
    for confidence, _ in stream(np.random.default_rng(6), 500, knee=0.5, below=0.5):
        falling.observe(confidence, True)
    assert falling.threshold == pytest.approx(0.82)  # four updates of 0.02 from 0.9
    with pytest.raises(ValueError, match="positive"):
        _controller(max_raise=0.0)


def test_it_waits_for_enough_audits_holds_small_moves_and_logs_every_change(caplog: pytest.LogCaptureFixture) -> None:
    controller = _controller(threshold=0.9, hysteresis=0.05)
    for confidence, agrees in stream(np.random.default_rng(2), 299, knee=0.5, below=0.99):
        controller.observe(confidence, agrees)
    assert controller.threshold == 0.9, "fewer than min_samples audits: no move"
    with caplog.at_level(logging.INFO, logger="tierserve.controller"):
        for confidence, agrees in stream(np.random.default_rng(3), 3000, knee=0.5, below=0.99):
            controller.observe(confidence, agrees)
    changes = [r for r in caplog.records if "exit threshold" in r.getMessage()]
    assert changes and controller.threshold < 0.9
    assert controller.metrics.registry.get_sample_value(
        "tierserve_exit_threshold", {"tier": "mobile"}) == controller.threshold
    with pytest.raises(ValueError, match="floor"):
        _controller(floor=0.9, ceiling=0.8)


def test_an_auditing_tier_feeds_its_controller(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A target no window of a few hundred audits can show (its bound stays under 0.999): the
    controller climbs from its floor towards the ceiling, a bounded step per update."""
    flags = {"mobile": {"audit_fraction": 1.0, "audit_budget_samples": 256, "threshold_controller": "true",
                        "controller_min_samples": 40, "controller_every": 20, "controller_floor": 0.6,
                        "controller_ceiling": 0.95, "agreement_target": 0.999}}
    rng = np.random.default_rng(4)
    texts = [sentence(rng, i % 2, 3) for i in range(240)]
    with running_tiers(tiny_artifacts, flags=flags, log_dir=tmp_path) as cluster, \
            TierClient(cluster.entry_address) as client:
        for start in range(0, len(texts), 8):
            client.classify(texts[start:start + 8])
        time.sleep(1.0)  # the last audits come back
        samples = scrape(cluster.tiers["mobile"].metrics_port)
        log = cluster.tiers["mobile"].log_tail()
    threshold = samples[("tierserve_exit_threshold", (("tier", "mobile"),))]
    assert 0.6 < threshold <= 0.95
    assert "mobile exit threshold 0.6000 -> 0.6500" in log, log
