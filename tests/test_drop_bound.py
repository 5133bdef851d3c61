"""The exact paired test and bound behind the cost policy's drop guarantee (shared.contract.drop_bound)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from shared.contract import drop_bound
from shared.contract.bounds import clopper_pearson_lower, clopper_pearson_upper
from shared.contract.drop_bound import (
    drop_certified,
    drop_p_value,
    drop_statistic,
    drop_upper_bound_from_counts,
)

N, BUDGET, DELTA = 1500, 0.003, 0.1  # the default build: 1,500 calibration sentences, 0.3 points


def most_lost_certified(gained: int, certified: Callable[[int, int], bool]) -> int:
    return max([lost for lost in range(15) if certified(lost, gained)] + [-1])


def test_certifies_more_lost_answers_than_bounding_the_two_rates_apart() -> None:
    def apart(lost: int, gained: int) -> bool:  # the bound the test replaced: delta split 0.9 / 0.1
        return clopper_pearson_upper(lost, N, 0.9 * DELTA) - clopper_pearson_lower(gained, N, 0.1 * DELTA) <= BUDGET

    def paired(lost: int, gained: int) -> bool:
        return drop_certified(lost, gained, N, BUDGET, DELTA)

    assert [most_lost_certified(g, apart) for g in range(6)] == [1, 1, 1, 1, 1, 2]
    assert [most_lost_certified(g, paired) for g in range(6)] == [1, 2, 2, 3, 4, 5]


def test_nothing_discordant_gives_the_rate_no_loss_in_n_rules_out() -> None:
    # with no answer lost or gained the supremum lies at pG = 0, where only a loss-free draw is as
    # extreme: P(0 lost) = (1 - b)^n, so the bound solves (1 - b)^n = delta (times the grid's margin)
    level = DELTA * drop_bound._GRID_MARGIN
    assert drop_upper_bound_from_counts(0, 0, N, DELTA) == pytest.approx(1 - level ** (1 / N), abs=2e-5)
    assert drop_p_value(0, 0, N, 0.002) == pytest.approx((1 - 0.002) ** N, rel=1e-9)


def test_bound_is_where_certification_starts() -> None:
    level = DELTA * drop_bound._GRID_MARGIN
    for lost, gained in ((2, 2), (6, 9)):
        bound = drop_upper_bound_from_counts(lost, gained, N, DELTA)
        assert bound >= (lost - gained) / N  # never below the observed drop
        assert drop_p_value(lost, gained, N, bound) <= level < drop_p_value(lost, gained, N, bound - 2e-5)
    # and the walk's certification at the default budget agrees with the bound
    assert drop_certified(2, 2, N, BUDGET, DELTA) and not drop_certified(3, 2, N, BUDGET, DELTA)
    assert drop_upper_bound_from_counts(2, 2, N, DELTA) <= BUDGET < drop_upper_bound_from_counts(3, 2, N, DELTA)


def full_trinomial_tail(t: float, n: int, budget: float, p_gained: float) -> float:
    """P(statistic <= t) summed over every (gained, lost) of n samples: no window, no shortcut."""
    g, k = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    possible = g + k <= n
    g, k = g[possible], k[possible]
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1)))))
    p_lost = p_gained + budget
    def count_log(count: np.ndarray, p: float) -> np.ndarray:  # count * log(p), 0 where count is 0
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(count == 0, 0.0, count * np.log(p))

    log_p = (log_fact[n] - log_fact[g] - log_fact[k] - log_fact[n - g - k] + count_log(g, p_gained)
             + count_log(k, p_lost) + count_log(n - g - k, 1 - p_gained - p_lost))
    return float(np.exp(log_p[drop_statistic(k, g, n, budget) <= t]).sum())


@pytest.mark.parametrize("n, budget, delta", [(300, 0.01, 0.1), (500, 0.01, 0.05)])
def test_size_at_the_boundary_stays_within_delta_by_a_full_sum(n: int, budget: float, delta: float) -> None:
    # the test is exact when its supremum over the nuisance rate is: check the probability of
    # certifying at the boundary pL = pG + budget by the full trinomial sum, on a grid of pG ten times
    # finer than the test's own, up to the largest pG H0 allows
    t = drop_bound._critical(n, budget, delta)
    top = (1 - budget) / 2
    fine = np.unique(np.concatenate([np.linspace(0, 60 / n, 601), np.linspace(60 / n, top - 1e-9, 300)]))
    assert max(full_trinomial_tail(t, n, budget, p) for p in fine) <= delta
    # and the test's own sum agrees with the full one where it looks
    for p in (0.0, 5 / n, 0.2, top - 1e-9):
        assert drop_bound._tail(t, n, budget, p) == pytest.approx(full_trinomial_tail(t, n, budget, p), abs=1e-6)


def test_drop_is_covered_in_at_least_one_minus_delta_of_draws() -> None:
    # the test's size at the boundary is close to delta (it is exact), so 1,000 draws estimate the
    # coverage within a Monte Carlo error: allowed 3 standard errors of 1,000 draws below 1 - delta
    # (the exact size is pinned on a fine grid above)
    rng = np.random.default_rng(11)
    allowance = 3 * np.sqrt(DELTA * (1 - DELTA) / 1000)
    for p_lost, p_gained in ((0.006, 0.003), (0.02, 0.01)):  # true drops 0.3 and 1 point
        covered = 0
        for _ in range(1000):
            u = rng.random(N)
            lost = int(np.sum((u >= p_gained) & (u < p_gained + p_lost)))
            gained = int(np.sum(u < p_gained))
            # the bound covers the true drop unless the test certifies a budget at the true drop
            covered += not drop_certified(lost, gained, N, p_lost - p_gained, DELTA)
        assert covered / 1000 >= 1 - DELTA - allowance, (p_lost, p_gained, covered)


def test_statistic_and_refusals() -> None:
    assert drop_statistic(0, 0, N, 0.0) == np.inf  # budget 0, nothing discordant: no evidence
    assert drop_statistic(1, 5, N, BUDGET) < drop_statistic(3, 5, N, BUDGET)  # more lost: less evidence
    assert not drop_certified(0, 0, N, 0.0, DELTA)
    assert drop_certified(3, 0, N, 1.0, DELTA)  # a budget of everything always holds
    assert not drop_certified(0, 0, 0, BUDGET, DELTA) and drop_upper_bound_from_counts(0, 0, 0, DELTA) == 1.0
    # an observed drop above the budget is never evidence for one below it, whatever delta
    assert drop_p_value(5, 0, 100, 0.045) == 1.0 and not drop_certified(5, 0, 100, 0.045, 0.8)
    assert drop_upper_bound_from_counts(5, 0, 100, 0.8) >= 0.05
    with pytest.raises(ValueError, match="do not fit"):
        drop_certified(10, 5, 12, BUDGET, DELTA)
    with pytest.raises(ValueError, match="delta"):
        drop_certified(1, 1, N, BUDGET, 1.0)
    with pytest.raises(ValueError, match="budget"):
        drop_p_value(1, 1, N, -0.1)
