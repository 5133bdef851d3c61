"""Thresholds and the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from shared.contract.bounds import binomial_tail, clopper_pearson_lower, clopper_pearson_upper
from shared.contract.drop_bound import drop_upper_bound_from_counts
from shared.contract.manifest import NEVER_EXIT, CostModel
from shared.contract.policy import (
    candidate_counts,
    choose_policy,
    cloud_only_cost,
    cost_aware_thresholds,
    describe_policy,
    drop_upper_bound,
    edge_threshold,
    exit_costs,
    guaranteed_threshold,
    p_tar_thresholds,
    path_thresholds,
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
    chosen = p_tar_thresholds(probs, labels, [0.9, 0.9])
    r = route(probs, [g.threshold for g in chosen])
    for i, g in enumerate(chosen):
        exited = r.exit_index == i
        assert exited.sum() == g.exits > 0
        accuracy = np.mean(r.prediction[exited] == labels[exited])
        assert accuracy >= g.bound >= 0.9  # the bound is below what it bounds, and above the target


def test_clopper_pearson_known_values() -> None:
    # every one of k right: the lower bound solves p**k = delta
    assert clopper_pearson_lower(30, 30, 0.1) == pytest.approx(0.1 ** (1 / 30), abs=1e-12)
    # none of n wrong... the upper bound on a rate with no events solves (1 - p)**n = delta
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), abs=1e-12)
    # 24 of 25: P(X >= 24 | p) = p**25 + 25 p**24 (1 - p) = 0.1 at the bound
    lb = clopper_pearson_lower(24, 25, 0.1)
    assert lb**25 + 25 * lb**24 * (1 - lb) == pytest.approx(0.1, abs=1e-9)
    assert binomial_tail(5, 10, 0.5) == pytest.approx(638 / 1024)
    assert clopper_pearson_lower(0, 10, 0.1) == 0.0 and clopper_pearson_upper(10, 10, 0.1) == 1.0


def calibrated_draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidence uniform on [0.5, 1], right with probability equal to it (a calibrated binary exit):
    the samples at or above tau are (1 + tau) / 2 accurate, so p_tar 0.9 is met exactly from tau 0.8."""
    conf = rng.uniform(0.5, 1.0, size=n)
    return conf, rng.random(n) < conf


def test_guarantee_holds_in_at_least_one_minus_delta_of_calibration_draws() -> None:
    rng = np.random.default_rng(20261203)
    p_tar, delta, draws = 0.9, 0.1, 1000
    safe_tau = 2 * p_tar - 1  # population accuracy above tau is (1 + tau) / 2
    met = uncorrected_met = exits = 0
    for _ in range(draws):
        conf, right = calibrated_draw(rng, 1000)
        g = guaranteed_threshold(conf, right, p_tar, delta)
        met += g.threshold >= safe_tau  # never exiting meets any target
        exits += g.threshold <= 1
        uncorrected_met += threshold_for_target(conf, right, p_tar) >= safe_tau
    assert met / draws >= 1 - delta
    assert exits / draws > 0.95  # and it is not met by refusing to exit
    # the rule without the guarantee misses about half the time: the test can tell them apart
    assert uncorrected_met / draws < 0.75


def binary_probs(confidence: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two-class probabilities whose top class is label 0 where `right`, label 1 elsewhere."""
    top = np.where(right, 0, 1)
    probs = np.empty((len(confidence), 2))
    probs[np.arange(len(confidence)), top] = confidence
    probs[np.arange(len(confidence)), 1 - top] = 1 - confidence
    return probs


def test_edge_guarantee_holds_after_a_mobile_threshold_chosen_on_the_same_draw() -> None:
    """The edge's candidates are the samples below a mobile threshold picked on the same calibration
    draw, and here the edge shares a fifth of the mobile's mistakes (the samples the mobile search
    stopped at are harder for the edge too). Over 1,000 draws of 1,500 from a population of 200,000,
    the edge's answers at the chosen thresholds reach p_tar on the whole population in >= 1 - delta
    of the draws, and the edge does answer in most of them."""
    rng = np.random.default_rng(20261203)
    p_tar, delta, n, draws = 0.9, 0.1, 1500, 1000
    size = 200_000
    mobile_conf = rng.uniform(0.5, 1.0, size)
    mobile_right = rng.random(size) < mobile_conf
    edge_conf = np.clip(mobile_conf + rng.normal(0.05, 0.15, size), 0.5, 0.9999)
    edge_right = np.where(rng.random(size) < 0.2, mobile_right, rng.random(size) < edge_conf)
    met = edge_answers = 0
    for _ in range(draws):
        i = rng.integers(0, size, n)
        probs = [binary_probs(mobile_conf[i], mobile_right[i]), binary_probs(edge_conf[i], edge_right[i]),
                 binary_probs(np.full(n, 0.99), np.ones(n, dtype=bool))]
        mobile, edge = p_tar_thresholds(probs, np.zeros(n, dtype=int), [p_tar, p_tar], delta)
        answered = (mobile_conf < mobile.threshold) & (edge_conf >= edge.threshold)
        met += not answered.any() or edge_right[answered].mean() >= p_tar
        edge_answers += answered.any()
    assert met / draws >= 1 - delta
    assert edge_answers / draws > 0.4


def test_consistency_target_needs_no_labels_and_bounds_agreement() -> None:
    rng = np.random.default_rng(7)
    n = 4000
    final_pred = rng.integers(0, 2, size=n)
    probs = []
    for agreement_at_top in (0.9, 0.97):
        conf = rng.uniform(0.5, 1.0, size=n)
        agree = rng.random(n) < np.clip(conf * agreement_at_top / 0.9, 0, 1)
        pred = np.where(agree, final_pred, 1 - final_pred)
        p = np.zeros((n, 2))
        p[np.arange(n), pred] = conf
        p[np.arange(n), 1 - pred] = 1 - conf
        probs.append(p)
    final = np.eye(2)[final_pred] * 0.9 + 0.05
    chosen = p_tar_thresholds([*probs, final], None, [0.95, 0.95], target="consistency")
    r = route([*probs, final], [g.threshold for g in chosen])
    for i, g in enumerate(chosen):
        exited = r.exit_index == i
        assert exited.any()
        assert np.mean(r.prediction[exited] == final_pred[exited]) >= g.bound >= 0.95
    with pytest.raises(ValueError, match="labels"):
        p_tar_thresholds([*probs, final], None, [0.9, 0.9], target="accuracy")


def test_fixed_sequence_stops_at_the_first_failed_threshold() -> None:
    # by confidence: 100 right, then 100 wrong, then 2,000 right. Taking all 2,200 is 95% right,
    # so a search that skipped failures would go to the bottom; fixed-sequence testing must not.
    n = 2200
    conf = np.linspace(0.999, 0.5, n)
    right = np.ones(n, dtype=bool)
    right[100:200] = False
    g = guaranteed_threshold(conf, right, 0.9, 0.1)
    counts = candidate_counts(n, 0.9, 0.1)
    assert counts[1] < 100 < counts[2] and counts[2] - counts[1] == 44  # steps of n / GRID
    assert g.tested == [conf[k - 1] for k in counts[:3]]
    assert g.failed_at == conf[counts[2] - 1]  # 100 right of the top 140: the first failure
    assert g.threshold == conf[counts[1] - 1] and g.exits == g.hits == counts[1]
    assert g.bound == pytest.approx(0.1 ** (1 / counts[1]))
    assert threshold_for_target(conf, right, 0.9) == conf[-1]  # the uncorrected rule takes them all


def test_threshold_ties_are_one_candidate() -> None:
    conf = np.array([0.9] * 60 + [0.6] * 40)
    right = np.array([True] * 60 + [False] * 40)
    g = guaranteed_threshold(conf, right, 0.9, 0.1, grid=10)
    assert g.threshold == 0.9 and g.exits == 60  # every 0.9 exits together, the 0.6s fail
    assert g.tested == [0.9, 0.6] and g.failed_at == 0.6


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


def test_cost_aware_choice_respects_its_bound_and_saves() -> None:
    probs, labels = synthetic_exits(n=6000)
    points, cost = (2, 4, 6), CostModel()
    choice = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0)
    r = route(probs, choice.thresholds)
    assert np.mean(r.prediction == labels) == pytest.approx(choice.accuracy)
    assert choice.drop_bound <= 0.01
    assert choice.accuracy >= choice.final_accuracy - choice.drop_bound
    assert relative_cost(r.fractions(), points, cost) == pytest.approx(choice.relative_cost)
    assert choice.relative_cost < 1.0  # cheaper than cloud-only


def test_drop_upper_bound_counts_lost_and_gained_answers() -> None:
    # 8 samples: final right and system wrong twice, the reverse once
    final = np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    system = np.array([1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    assert drop_upper_bound(final, system, 0.1) == drop_upper_bound_from_counts(2, 1, 8, 0.1)
    assert drop_upper_bound(final, system, 0.1) > 1 / 8  # above the measured drop
    # identical answers: nothing lost, and the bound is the rate no loss in n rules out
    assert drop_upper_bound(final, final, 0.1) == drop_upper_bound_from_counts(0, 0, 8, 0.1)
    # where nothing is lost or gained, only a loss-free draw is as extreme: (1 - b)^8 = delta
    assert drop_upper_bound(final, final, 0.1) == pytest.approx(1 - (0.1 * 0.995) ** (1 / 8), abs=2e-5)


def test_cost_aware_path_stops_at_first_failure_and_smaller_delta_is_more_careful() -> None:
    probs, labels = synthetic_exits(seed=2, n=4000)
    points, cost = (2, 4, 6), CostModel()
    loose = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, delta=0.5, exponents=(1.0,))
    careful = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, delta=0.01, exponents=(1.0,))
    assert careful.relative_cost >= loose.relative_cost
    assert careful.thresholds[0] >= loose.thresholds[0]
    final_correct = probs[-1].argmax(-1) == labels
    correct = [p.argmax(-1) == labels for p in probs]
    # one path: the candidate after the chosen one failed its test, and was the last tested
    taus = list(path_thresholds(probs))
    i = taus.index(careful.thresholds[0])
    assert careful.tested == i + 2
    r = route(probs, [taus[i + 1]] * 2)
    assert drop_upper_bound(final_correct, np.choose(r.exit_index, correct), 0.01) > 0.01
    with pytest.raises(ValueError, match="delta"):
        cost_aware_thresholds(probs, labels, points, cost, delta=1.0)


def test_cost_aware_paths_share_delta_and_the_cheapest_wins() -> None:
    probs, labels = synthetic_exits(seed=3, n=4000)
    points, cost = (2, 4, 6), CostModel()
    both = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, exponents=(1.0, 0.5))
    assert both.edge_exponent in (1.0, 0.5)
    assert both.thresholds[1] == pytest.approx(edge_threshold(both.thresholds[0], both.edge_exponent))
    # each path alone at delta / 2: the pair's choice is the cheaper of the two
    alone = [cost_aware_thresholds(probs, labels, points, cost, max_drop_points=1.0, delta=0.05, exponents=(e,))
             for e in (1.0, 0.5)]
    assert both.relative_cost == pytest.approx(min(a.relative_cost for a in alone))
    assert both.tested == sum(a.tested for a in alone)
    assert edge_threshold(0.91, 0.5) == pytest.approx(0.7) and edge_threshold(NEVER_EXIT, 0.5) == NEVER_EXIT


def test_cost_aware_guarantee_holds_in_at_least_one_minus_delta_of_draws() -> None:
    # a population whose drop at any thresholds is known: exits that are calibrated, a final exit
    # that is always right, so the drop is the early answers' error rate times their share
    rng = np.random.default_rng(5)
    points, cost, budget, delta = (2, 4, 6), CostModel(), 1.0, 0.1

    def draw(n: int) -> tuple[list[np.ndarray], np.ndarray]:
        labels = rng.integers(0, 2, size=n)
        probs = []
        for _ in range(2):
            conf = rng.uniform(0.5, 1.0, size=n)
            pred = np.where(rng.random(n) < conf, labels, 1 - labels)
            p = np.zeros((n, 2))
            p[np.arange(n), pred], p[np.arange(n), 1 - pred] = conf, 1 - conf
            probs.append(p)
        return [*probs, np.eye(2)[labels] * 0.9 + 0.05], labels

    def true_drop(taus: list[float]) -> float:
        # P(exit at mobile) E[1 - c | c >= t] + P(reach edge) P(exit at edge) E[1 - c | c >= t_e]
        def share_err(t: float) -> tuple[float, float]:
            t = min(max(t, 0.5), 1.0)
            share = (1.0 - t) / 0.5
            return share, share * (1.0 - t) / 2
        (s_m, e_m), (_, e_e) = share_err(taus[0]), share_err(taus[1])
        return e_m + (1 - s_m) * e_e

    safe, costs, safe_default, costs_default = 0, [], 0, []
    for _ in range(200):
        probs, labels = draw(2000)
        # two paths, each at delta / 2: the union is what must still hold. (Here the edge is no closer to the
        # final exit than the mobile, so the default path, which lets the edge answer at lower confidence,
        # exits early less.)
        choice = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=budget, delta=delta,
                                       grid=50, exponents=(1.0, 0.5))
        safe += true_drop(choice.thresholds) <= budget / 100
        costs.append(choice.relative_cost)
        default = cost_aware_thresholds(probs, labels, points, cost, max_drop_points=budget, delta=delta, grid=50)
        safe_default += true_drop(default.thresholds) <= budget / 100
        costs_default.append(default.relative_cost)
    cloud = relative_cost(np.array([0, 0, 1.0]), points, cost)
    assert safe / 200 >= 1 - delta and safe_default / 200 >= 1 - delta
    assert np.mean(costs) < cloud - 0.1  # it does exit early
    assert np.mean(costs_default) < cloud - 0.01


def test_cost_aware_with_zero_budget_keeps_final_accuracy() -> None:
    probs, labels = synthetic_exits(seed=1)
    choice = cost_aware_thresholds(probs, labels, (2, 4, 6), CostModel(), max_drop_points=0.0)
    assert choice.accuracy >= choice.final_accuracy


def test_choose_policy_records_delta_and_bounds() -> None:
    probs, labels = synthetic_exits(n=4000)
    taus, spec = choose_policy("p_tar", probs, labels, (2, 4, 6), CostModel(), p_tar=(0.85, 0.9), delta=0.05)
    assert spec.delta == 0.05 and spec.target == "accuracy"
    assert set(spec.bound) <= {"mobile", "edge"} and all(b >= 0.85 for b in spec.bound.values())
    assert "probability >= 0.95" in describe_policy(spec)
    taus, spec = choose_policy("cost", probs, labels, (2, 4, 6), CostModel(), max_drop_points=1.0)
    assert spec.delta == 0.1 and spec.drop_bound_points is not None and spec.drop_bound_points <= 1.0
    assert "cost-aware" in describe_policy(spec)
