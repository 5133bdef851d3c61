"""Exact binomial tails and Clopper-Pearson bounds, numpy only (serving and retune need no scipy).

The thresholds' guarantees (shared.contract.policy) rest on these: a one-sided Clopper-Pearson bound
at level delta holds with probability >= 1 - delta for any true rate, with no normal approximation
(which undercovers at the few dozen errors an exit's calibration sample holds).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_BISECTION_STEPS = 60  # halves [0, 1] down to ~1e-18: below float64 resolution of the bound


@functools.lru_cache(maxsize=8)
def log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n (read-only: cached, for the few sample sizes a build tests at)."""
    table = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))))
    table.flags.writeable = False
    return table


def log_binomial_pmf(k: np.ndarray, m: np.ndarray | int, p: float, log_fact: np.ndarray) -> np.ndarray:
    """log P(X = k) for X ~ Binomial(m, p), elementwise; `log_fact` from log_factorials(at least max m)."""
    if p <= 0.0:
        return np.where(k == 0, 0.0, -np.inf)
    if p >= 1.0:
        return np.where(k == m, 0.0, -np.inf)
    return log_fact[m] - log_fact[k] - log_fact[m - k] + k * math.log(p) + (m - k) * math.log1p(-p)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_pmf = log_binomial_pmf(np.arange(k, n + 1), n, p, log_factorials(n))
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def clopper_pearson_lower(k: int, n: int, delta: float) -> float:
    """One-sided lower bound on a binomial rate from k successes in n: the p at which
    P(X >= k | p) = delta (0 when k = 0). It is >= a target exactly when binomial_tail(k, n, target)
    <= delta, the test the fixed-sequence search runs."""
    check_delta(delta)
    if n == 0 or k <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):  # the tail rises with p
        mid = (lo + hi) / 2
        if binomial_tail(k, n, mid) > delta:
            hi = mid
        else:
            lo = mid
    return lo


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided upper bound on a binomial rate from k successes in n (1 when k = n)."""
    check_delta(delta)
    if n == 0 or k >= n:
        return 1.0
    # failures are binomial too: the upper bound on successes is 1 - the lower bound on failures
    return 1.0 - clopper_pearson_lower(n - k, n, delta)


def check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta {delta} must be in (0, 1)")
