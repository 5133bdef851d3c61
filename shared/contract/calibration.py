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


def ece_interval(probs: np.ndarray, labels: np.ndarray, level: float = 0.9, resamples: int = 1000, seed: int = 0,
                 n_bins: int = ECE_BINS) -> tuple[float, float]:
    """Percentile bootstrap interval of the ECE: how far a few hundred test samples pin it down
    (a 0.01 difference between two exits is often inside it). ECE is biased upwards on small or
    resampled sets (sampling noise only adds gaps), so for a well-calibrated exit the interval can
    sit above the point estimate: read it as the spread, not as an unbiased range."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if n == 0:
        return (float("nan"), float("nan"))
    values = [expected_calibration_error(probs[idx], labels[idx], n_bins)
              for idx in rng.integers(0, n, size=(resamples, n))]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float  # the temperature to ship (1.0 when the fit was rejected)
    fitted: float  # fitted on the whole calibration split
    kept: bool
    nll_before: float  # mean held-out NLL over the folds, T = 1
    nll_after: float  # mean held-out NLL over the folds, each fold at the T fitted without it
    fold_temperatures: tuple[float, ...] = ()


def fold_indices(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """The cross-validation folds calibrate_exit uses: a seeded permutation cut into `folds` parts."""
    return np.array_split(np.random.default_rng(seed).permutation(n), min(folds, n))


def calibrate_exit(logits: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = DEFAULT_FOLDS
                   ) -> TemperatureFit:
    """Fit T on the calibration split; keep it only if k-fold cross-validation says it helps.

    Each fold's held-out NLL is measured at T = 1 and at the T fitted on the other folds; T ships
    when the mean held-out NLL improves. Every sample is judged once, so the verdict rests on the
    whole split rather than on one half: a single half-split rejected temperatures of 1.02-1.08 on
    a news dataset because its check half's NLL rose by 1-2e-4, noise of that half alone. Temperature
    scaling can still make things worse (too few samples, a shifted split): then T = 1 ships and
    the fit is reported as rejected.
    """
    n = len(labels)
    fitted = fit_temperature(logits, labels) if n else 1.0
    if n < 2:
        return TemperatureFit(1.0, fitted, False, float("nan"), float("nan"))
    before = after = 0.0
    fold_ts = []
    for held in fold_indices(n, folds, seed):
        rest = np.setdiff1d(np.arange(n), held, assume_unique=True)
        t = fit_temperature(logits[rest], labels[rest])
        fold_ts.append(t)
        before += nll(logits[held], labels[held], 1.0) * len(held)
        after += nll(logits[held], labels[held], t) * len(held)
    before, after = before / n, after / n
    kept = after < before
    return TemperatureFit(fitted if kept else 1.0, fitted, kept, before, after, tuple(fold_ts))
