"""Calibration maths on constructed logits with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from shared.contract.calibration import (
    calibrate_exit,
    ece_interval,
    expected_calibration_error,
    fit_temperature,
    fold_indices,
    nll,
    reliability_bins,
    softmax,
)


def sample_calibrated(n: int, true_temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 3))
    probs = softmax(logits, true_temperature)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    return logits, labels


def test_overconfident_logits_get_temperature_above_one() -> None:
    logits, labels = sample_calibrated(4000, true_temperature=2.5)
    t = fit_temperature(logits, labels)
    assert t > 1.5
    assert t == pytest.approx(2.5, rel=0.15)


def test_underconfident_logits_get_temperature_below_one() -> None:
    logits, labels = sample_calibrated(4000, true_temperature=0.5, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.15)


def test_fitted_temperature_minimises_nll() -> None:
    logits, labels = sample_calibrated(2000, true_temperature=1.7, seed=2)
    t = fit_temperature(logits, labels)
    for other in (t * 0.9, t * 1.1):
        assert nll(logits, labels, t) < nll(logits, labels, other)


def test_ece_of_perfectly_calibrated_set_is_near_zero() -> None:
    logits, labels = sample_calibrated(20000, true_temperature=1.0, seed=3)
    assert expected_calibration_error(softmax(logits), labels) < 0.015


def test_ece_of_overconfident_set_is_large_and_fixed_by_temperature() -> None:
    logits, labels = sample_calibrated(20000, true_temperature=3.0, seed=4)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, fit_temperature(logits, labels)), labels)
    assert before > 0.1
    assert after < 0.02


def test_ece_known_value() -> None:
    # every prediction has confidence 0.9 but only half are right: ECE = |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0, 1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    bins = reliability_bins(probs, labels)
    assert bins.count.sum() == 10 and bins.count[13] == 10  # 0.9 falls in (0.8667, 0.9333]


def folded_labels(n: int, folds: int, class0_share: list[float], seed: int = 0) -> np.ndarray:
    """Labels whose share of class 0 is set per cross-validation fold (calibrate_exit's own folds)."""
    labels = np.ones(n, dtype=np.int64)
    for held, share in zip(fold_indices(n, folds, seed), class0_share, strict=True):
        labels[held[: round(share * len(held))]] = 0
    return labels


def test_fit_that_no_fold_confirms_is_rejected() -> None:
    # every logit is [3, 0]: at T = 1 the model says 95.3% class 0. Two folds are all class 0, two
    # 88%: the whole split (94%) asks for T > 1, but each fold, fitted without it, leans the other
    # way from what it holds, so every held-out fold's NLL rises: cross-validation says no
    n = 400
    logits = np.tile([3.0, 0.0], (n, 1))
    labels = folded_labels(n, 4, [1.0, 1.0, 0.88, 0.88])
    fit = calibrate_exit(logits, labels, seed=0, folds=4)
    assert fit.fitted > 1.0
    assert not fit.kept and fit.temperature == 1.0
    assert fit.nll_after > fit.nll_before
    assert len(fit.fold_temperatures) == 4


def test_fit_that_every_fold_confirms_is_kept() -> None:
    n = 400
    logits = np.tile([3.0, 0.0], (n, 1))
    labels = folded_labels(n, 4, [0.9, 0.9, 0.9, 0.9])  # 90% everywhere: softer than T = 1 says
    fit = calibrate_exit(logits, labels, seed=0, folds=4)
    assert fit.kept and fit.temperature == fit.fitted > 1.0
    assert fit.nll_after < fit.nll_before
    assert all(t == pytest.approx(fit.fitted, rel=1e-3) for t in fit.fold_temperatures)


def test_good_fit_is_kept() -> None:
    logits, labels = sample_calibrated(3000, true_temperature=2.0, seed=5)
    fit = calibrate_exit(logits, labels)
    assert fit.kept and fit.temperature == fit.fitted and fit.nll_after < fit.nll_before


def test_cross_validation_keeps_a_small_true_temperature_more_often_than_a_half_split() -> None:
    # a true temperature of 1.2 on 1,500 samples: the fit is right, and a single check part (30%)
    # is a noisy judge of it (it rejected 3 of these 40 draws)
    kept_cv = kept_half = 0
    for seed in range(40):
        logits, labels = sample_calibrated(1500, true_temperature=1.2, seed=100 + seed)
        kept_cv += calibrate_exit(logits, labels, seed=seed).kept
        order = np.random.default_rng(seed).permutation(1500)
        check, fit = order[:450], order[450:]
        t = fit_temperature(logits[fit], labels[fit])
        kept_half += nll(logits[check], labels[check], t) < nll(logits[check], labels[check], 1.0)
    assert kept_cv >= kept_half
    assert kept_cv >= 39


def test_ece_interval_brackets_the_ece_and_narrows_with_samples() -> None:
    logits, labels = sample_calibrated(4000, true_temperature=2.0, seed=6)
    probs = softmax(logits)
    ece = expected_calibration_error(probs, labels)
    lo, hi = ece_interval(probs, labels, resamples=300)
    assert lo <= ece <= hi
    small_lo, small_hi = ece_interval(probs[:400], labels[:400], resamples=300)
    assert small_hi - small_lo > hi - lo
