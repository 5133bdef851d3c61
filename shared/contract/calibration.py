"""Calibration maths: temperature scaling (Guo et al. 2017), one temperature per exit, and ECE.

numpy only, so that the builder, the serving tiers and bench/ share one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_rows(logits: list[list[float]], temperature: float = 1.0) -> list[list[float]]:
    """softmax for a few rows of Python floats: the same maths in float64, without numpy's
    per-call set-up (the tier's exit decision, one request at a time)."""
    probs = []
    for row in logits:
        top = max(row)
        e = [math.exp((x - top) / temperature) for x in row]
        total = math.fsum(e)
        probs.append([v / total for v in e])
    return probs


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(z).sum(axis=-1))
    return float(np.mean(log_z - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tol: float = 1e-5) -> float:
    """The T > 0 minimising NLL, by golden-section search over log T.

    NLL is convex in 1/T, hence unimodal in log T, so the search finds the global minimum.
    """
    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


@dataclass(frozen=True)
class ReliabilityBins:
    edges: np.ndarray  # n_bins + 1
    confidence: np.ndarray  # mean confidence per bin (nan where empty)
    accuracy: np.ndarray  # accuracy per bin (nan where empty)
    count: np.ndarray


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> ReliabilityBins:
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins are (lo, hi]; a confidence of exactly 0 falls in the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges, mean_conf, accuracy, count)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(gaps * bins.count[filled]) / bins.count.sum())


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float  # the temperature to ship (1.0 when the fit was rejected)
    fitted: float  # what the search found
    kept: bool
    nll_before: float  # on the check half, T = 1
    nll_after: float  # on the check half, T = fitted


def calibrate_exit(
    logits: np.ndarray, labels: np.ndarray, seed: int = 0, check_fraction: float = 0.3
) -> TemperatureFit:
    """Fit T on one part of the calibration split; keep it only if it lowers NLL on the rest.

    Temperature scaling can make things worse (too few samples, a shifted split): then T = 1
    ships and the fit is reported as rejected.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    n_check = max(1, int(len(labels) * check_fraction))
    check, fit = order[:n_check], order[n_check:]
    fitted = fit_temperature(logits[fit], labels[fit])
    before = nll(logits[check], labels[check], 1.0)
    after = nll(logits[check], labels[check], fitted)
    kept = after < before
    return TemperatureFit(fitted if kept else 1.0, fitted, kept, before, after)
