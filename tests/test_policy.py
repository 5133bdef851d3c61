"""Thresholds and the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from shared.contract.manifest import NEVER_EXIT, CostModel
from shared.contract.policy import (
    cloud_only_cost,
    exit_costs,
    p_tar_thresholds,
    relative_cost,
    route,
    threshold_for_target,
)


def test_cost_model_matches_design_formula() -> None:
    cost = CostModel()
    m, n, total = 2, 4, 6
    assert exit_costs((m, n, total), cost) == pytest.approx([0.2, 0.2 + 0.3 + 0.2, 0.7 + 0.3 + 0.2])
    assert cloud_only_cost((m, n, total), cost) == pytest.approx(0.3 + 0.6)
    assert relative_cost(np.array([1.0, 0, 0]), (m, n, total), cost) == pytest.approx(0.2 / 0.9)
    assert relative_cost(np.array([0, 0, 1.0]), (m, n, total), cost) == pytest.approx(1.2 / 0.9)


def test_threshold_is_smallest_reaching_target() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    # top-3 are 100% right, top-4 75%, top-5 80%, top-6 66.7%
    assert threshold_for_target(conf, correct, 0.8) == pytest.approx(0.7)
    assert threshold_for_target(conf, correct, 0.9) == pytest.approx(0.9)
    assert threshold_for_target(conf, np.zeros(6, dtype=bool), 0.5) == NEVER_EXIT


def test_threshold_never_splits_equal_confidences() -> None:
    conf = np.array([0.9, 0.9, 0.9, 0.5])
    correct = np.array([1, 0, 1, 1], dtype=bool)
    # taking all three 0.9s gives 2/3: below 0.9, so no threshold at 0.9 meets it
    assert threshold_for_target(conf, correct, 0.9) == NEVER_EXIT


def test_route_applies_tier_rule_in_order() -> None:
    probs = [np.array([[0.95, 0.05], [0.6, 0.4], [0.55, 0.45]]),
             np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]]),
             np.array([[0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])]
    r = route(probs, [0.9, 0.85])
    assert r.exit_index.tolist() == [0, 1, 2]
    assert r.prediction.tolist() == [0, 1, 1]
    assert route(probs, [0.0, 0.0]).exit_index.tolist() == [0, 0, 0]
    assert route(probs, [NEVER_EXIT, NEVER_EXIT]).exit_index.tolist() == [2, 2, 2]


def test_p_tar_thresholds_meet_target_on_their_data() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.integers(0, 2, size=n)
    probs = []
    for quality in (0.7, 0.85, 0.95):
        conf = rng.uniform(0.5, 1.0, size=n)
        right = rng.random(n) < np.clip(conf * quality / 0.75, 0, 1)
        pred = np.where(right, labels, 1 - labels)
        p = np.zeros((n, 2))
        p[np.arange(n), pred] = conf
        p[np.arange(n), 1 - pred] = 1 - conf
        probs.append(p)
    taus = p_tar_thresholds(probs, labels, [0.9, 0.9])
    r = route(probs, taus)
    for i in range(2):
        exited = r.exit_index == i
        assert exited.any()
        assert np.mean(r.prediction[exited] == labels[exited]) >= 0.9


def synthetic_exits(n: int = 2000, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Three exits of rising quality whose confidence tracks correctness."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    probs = []
    for quality in (0.75, 0.85, 0.92):
        conf = rng.uniform(0.5, 1.0, size=n)
        right = rng.random(n) < np.clip(conf + quality - 0.75, 0, 1)
        pred = np.where(right, labels, 1 - labels)
        p = np.zeros((n, 2))
        p[np.arange(n), pred] = conf
        p[np.arange(n), 1 - pred] = 1 - conf
        probs.append(p)
    return probs, labels


def test_cost_aware_choice_respects_accuracy_floor_and_beats_p_tar() -> None:
    from shared.contract.policy import cost_aware_thresholds

    probs, labels = synthetic_exits()
    points, cost = (2, 4, 6), CostModel()
    choice = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, confidence=0.5)
    r = route(probs, choice.thresholds)
    assert np.mean(r.prediction == labels) == pytest.approx(choice.accuracy)
    assert choice.accuracy >= choice.final_accuracy - 0.01
    assert relative_cost(r.fractions(), points, cost) == pytest.approx(choice.relative_cost)
    assert choice.relative_cost < relative_cost(np.array([0, 0, 1.0]), points, cost)
    # any p_tar policy that is at least as accurate costs at least as much
    for p_tar in (0.85, 0.9, 0.95, 0.98):
        rp = route(probs, p_tar_thresholds(probs, labels, [p_tar, p_tar]))
        if np.mean(rp.prediction == labels) >= choice.final_accuracy - 0.01:
            assert relative_cost(rp.fractions(), points, cost) >= choice.relative_cost - 1e-9


def test_drop_upper_bound_adds_the_paired_standard_error() -> None:
    from shared.contract.policy import drop_upper_bound

    final = np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    system = np.array([1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)  # differences 0,1,0,0,-1,1,0,0: mean 1/8
    diff = final.astype(float) - system
    assert drop_upper_bound(final, system, 0.5) == pytest.approx(0.125)
    z90 = 1.2815515655446004
    assert drop_upper_bound(final, system, 0.9) == pytest.approx(0.125 + z90 * diff.std(ddof=1) / np.sqrt(8))
    assert drop_upper_bound(final, final, 0.99) == 0.0  # identical answers: no drop, no doubt


def test_cost_aware_confidence_keeps_a_margin_on_the_drop() -> None:
    from shared.contract.policy import cost_aware_thresholds, drop_upper_bound

    probs, labels = synthetic_exits(seed=2)
    points, cost = (2, 4, 6), CostModel()
    final_correct = probs[-1].argmax(-1) == labels
    plain = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, confidence=0.5)
    careful = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, confidence=0.95)
    bound = {name: drop_upper_bound(final_correct, route(probs, c.thresholds).prediction == labels, 0.95)
             for name, c in (("plain", plain), ("careful", careful))}
    assert bound["careful"] <= 0.01 < bound["plain"]  # the margin changed the choice, and holds
    assert careful.relative_cost > plain.relative_cost
    with pytest.raises(ValueError, match="confidence"):
        cost_aware_thresholds(probs, labels, points, cost, confidence=1.0)


def test_cost_aware_with_zero_budget_keeps_final_accuracy() -> None:
    from shared.contract.policy import cost_aware_thresholds

    probs, labels = synthetic_exits(seed=1)
    choice = cost_aware_thresholds(probs, labels, (2, 4, 6), CostModel(), max_drop_points=0.0)
    assert choice.accuracy >= choice.final_accuracy
