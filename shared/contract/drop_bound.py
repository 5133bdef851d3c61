"""An exact test, and the bound it gives, for the accuracy drop of early exits against the final exit.

Each calibration sample is one of three outcomes: the final exit right and the system wrong (lost,
rate pL), the reverse (gained, pG), or neither. The drop is pL - pG. The cost policy certifies a
threshold when it rejects H0: pL - pG >= b (b the budget) at level delta.

The test is exact and unconditional, as for a paired non-inferiority trial: Tango's score
statistic (Tango 1998), the observed drop minus b over its standard error with the rates fitted
under H0, and as p-value the largest probability, over every pG with pL = pG + b, of a statistic as
low as the one observed (the plain supremum over the nuisance rate). The boundary pL = pG + b holds
the supremum over all of H0: at a fixed pG a larger pL makes more lost answers likely, and where the
statistic is <= 0 it rises with the lost count (so certification asks for a statistic <= 0: an
observed drop above the budget is never evidence for one below it, whatever delta).

Bounding the two rates apart (an upper bound on pL minus a lower one on pG, each with a share of
delta) is also exact but spends delta twice and ignores that the two counts move together: at
1,500 samples and a 0.3-point budget it certified one lost answer whatever the gains, this test
two with one gained (tests/test_drop_bound.py pins both).

The supremum is taken over a grid of pG: fine where few samples are discordant (where it lies when
the counts are a handful) and geometric up to the largest pG H0 allows; tests/test_drop_bound.py
checks the size against a full trinomial sum on a grid ten times finer. numpy only, as bounds.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from shared.contract.bounds import check_delta, log_binomial_pmf, log_factorials

# window of each count kept around its mean, in standard deviations plus one count: the mass left
# out is below 1e-6 even where the mean is a fraction of a count, far inside the margin below
_WINDOW_SD = 6.0
# the nuisance grid: linear over the first _LINEAR_EXPECTED discordant samples' worth of pG, at a step
# of _LINEAR_STEP samples, then _GEOMETRIC_POINTS up to the largest pG
_LINEAR_EXPECTED, _LINEAR_STEP, _GEOMETRIC_POINTS = 30.0, 0.5, 30
_CRITICAL_RESOLUTION = 1e-5  # of the statistic: count pairs closer than this are decided alike
_STATISTIC_RANGE = 20.0  # |statistic| beyond which the p-value is 0 or 1 to double precision
_BOUND_RESOLUTION = 1e-5  # accuracy units: 0.001 points
# the grid's supremum is compared with delta times this: between grid points the probability can rise
# a little above the grid's largest (by 2e-4 of delta where a 10x finer grid was tried)
_GRID_MARGIN = 0.995


def drop_statistic(lost: np.ndarray | int, gained: np.ndarray | int, n: int, budget: float) -> np.ndarray:
    """Tango's score statistic for H0: pL - pG >= budget from counts of n paired samples (low values
    speak against H0). Where its variance is zero (budget 0, nothing discordant) it is +inf: no
    evidence at all."""
    lost_f, gained_f = np.asarray(lost, dtype=np.float64), np.asarray(gained, dtype=np.float64)
    # the restricted maximum-likelihood pG under pL = pG + budget: the non-negative root of
    # 2n p^2 - linear p - constant = 0 (Tango 1998)
    linear = lost_f * (1 - budget) + gained_f * (1 - 3 * budget) - 2 * budget * (n - lost_f - gained_f)
    constant = gained_f * budget * (1 - budget)
    p_gained = (linear + np.sqrt(linear * linear + 8 * n * constant)) / (4 * n)
    variance = n * (2 * p_gained + budget - budget * budget)
    numerator = lost_f - gained_f - n * budget
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(variance > 0, numerator / np.sqrt(np.maximum(variance, 1e-300)), np.inf)


def _window(mean: float, sd: float, n: int) -> np.ndarray:
    return np.arange(max(0, math.floor(mean - _WINDOW_SD * sd - 1)), min(n, math.ceil(mean + _WINDOW_SD * sd + 1)) + 1)


def _tail(t: float, n: int, budget: float, p_gained: float) -> float:
    """P(statistic <= t) when pG = p_gained and pL = p_gained + budget (a trinomial of n)."""
    log_fact = log_factorials(n)
    p_lost = min(1.0, p_gained + budget)
    p_lost_if_not_gained = min(1.0, p_lost / (1 - p_gained))
    gained = _window(n * p_gained, math.sqrt(n * p_gained * (1 - p_gained)), n)
    # the lost count's window around its marginal mean (Binomial(n, pL)), whose tails bound the
    # joint mass left out
    lost = _window(n * p_lost, math.sqrt(n * p_lost * (1 - p_lost)), n)
    if t <= 0:  # a statistic <= 0 needs lost <= gained + n * budget
        lost = lost[lost <= gained[-1] + math.floor(n * budget)]
    g, k = np.meshgrid(gained, lost, indexing="ij")
    inside = (g + k <= n) & (drop_statistic(k, g, n, budget) <= t)
    if not inside.any():
        return 0.0
    g, k = g[inside], k[inside]
    log_p = log_binomial_pmf(g, n, p_gained, log_fact) + log_binomial_pmf(k, n - g, p_lost_if_not_gained, log_fact)
    return float(np.exp(log_p).sum())


@functools.lru_cache(maxsize=64)
def _nuisance_grid(n: int, budget: float) -> tuple[float, ...]:
    top = (1 - budget) / 2
    linear_top = min(top, _LINEAR_EXPECTED / n)
    linear = np.arange(0.0, linear_top, _LINEAR_STEP / n)
    geometric = np.geomspace(max(linear_top, 1e-12), top, _GEOMETRIC_POINTS) if top > linear_top else np.array([top])
    return tuple(float(p) for p in np.unique(np.concatenate([linear, geometric])))


def _p_value_of(t: float, n: int, budget: float) -> float:
    return max(_tail(t, n, budget, p) for p in _nuisance_grid(n, budget))


def drop_p_value(lost: int, gained: int, n: int, budget: float) -> float:
    """The exact p-value of H0: drop >= budget, from `lost` and `gained` of n paired samples. Where
    the observed drop is above the budget (a statistic > 0) it is 1: such counts are no evidence
    for a drop below it, and the supremum on the boundary is proven only for statistics <= 0."""
    _check_counts(lost, gained, n)
    _check_budget(budget)
    if n == 0:
        return 1.0
    if budget >= 1.0:
        return 0.0 if lost < n else 1.0
    statistic = float(drop_statistic(lost, gained, n, budget))
    return 1.0 if statistic > 0 else _p_value_of(statistic, n, budget)


@functools.lru_cache(maxsize=256)
def _critical(n: int, budget: float, delta: float) -> float:
    """The largest t <= 0 whose p-value is <= delta (-inf if none): a count pair is certified exactly
    when its statistic is at most this. The p-value rises with t, so bisection finds it."""
    level = delta * _GRID_MARGIN
    if _p_value_of(-_STATISTIC_RANGE, n, budget) > level:
        return -math.inf
    if _p_value_of(0.0, n, budget) <= level:
        return 0.0
    low, high = -_STATISTIC_RANGE, 0.0
    # narrow the bracket first: the critical value of any delta in common use lies in [-8, 0]
    if _p_value_of(-8.0, n, budget) <= level:
        low = -8.0
    while high - low > _CRITICAL_RESOLUTION:
        mid = (low + high) / 2
        if _p_value_of(mid, n, budget) <= level:
            low = mid
        else:
            high = mid
    return low


def drop_certified(lost: int, gained: int, n: int, budget: float, delta: float) -> bool:
    """True when the test rejects H0: drop >= budget at level delta, i.e. the drop is certified to be
    below `budget` with probability >= 1 - delta over the calibration draw. One p-value search per
    (n, budget, delta), cached: the cost policy's walk asks this of every candidate."""
    _check_counts(lost, gained, n)
    _check_budget(budget)
    check_delta(delta)
    if n == 0:
        return False
    if budget >= 1.0:
        return lost < n
    return bool(drop_statistic(lost, gained, n, budget) <= _critical(n, float(budget), float(delta)))


def drop_upper_bound_from_counts(lost: int, gained: int, n: int, delta: float) -> float:
    """Upper bound (probability >= 1 - delta) on the drop, in accuracy units: the smallest budget the
    test certifies, to 0.001 points (1 if none below 1). Never below the observed drop."""
    _check_counts(lost, gained, n)
    check_delta(delta)
    if n == 0:
        return 1.0
    low, high = max(0.0, (lost - gained) / n), 1.0
    while high - low > _BOUND_RESOLUTION:
        mid = (low + high) / 2
        if drop_p_value(lost, gained, n, mid) <= delta * _GRID_MARGIN:
            high = mid
        else:
            low = mid
    return high


def _check_counts(lost: int, gained: int, n: int) -> None:
    if lost < 0 or gained < 0 or lost + gained > n:
        raise ValueError(f"counts lost {lost}, gained {gained} do not fit {n} samples")


def _check_budget(budget: float) -> None:
    if not budget >= 0.0:
        raise ValueError(f"budget {budget} must be >= 0")
