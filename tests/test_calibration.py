"""Calibration maths on constructed logits with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from shared.contract.calibration import (
    calibrate_exit,
    expected_calibration_error,
    fit_temperature,
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


def test_fit_that_makes_things_worse_is_rejected() -> None:
    # every fit sample is confident and right, every check sample confident and wrong:
    # the fit sharpens the logits, which raises the check half's NLL
    logits = np.array([[4.0, 0.0]] * 200)
    labels = np.zeros(200, dtype=np.int64)
    check = np.random.default_rng(0).permutation(200)[:60]  # calibrate_exit's own split
    labels[check] = 1
    fit = calibrate_exit(logits, labels, seed=0, check_fraction=0.3)
    assert fit.fitted < 1.0
    assert not fit.kept
    assert fit.temperature == 1.0
    assert fit.nll_after >= fit.nll_before


def test_good_fit_is_kept() -> None:
    logits, labels = sample_calibrated(3000, true_temperature=2.0, seed=5)
    fit = calibrate_exit(logits, labels)
    assert fit.kept and fit.temperature == fit.fitted and fit.nll_after < fit.nll_before
