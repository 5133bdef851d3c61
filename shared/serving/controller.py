"""A threshold that follows the traffic: per exit, over a sliding window of audited samples
(shared.serving.audit: their confidence at this exit, and whether this exit's label was the final
exit's), the lowest threshold whose agreement with the final exit meets the target with probability
1 - delta, by the build's own guaranteed search (shared.contract.policy.guaranteed_threshold).

Every `every` new audits the search runs again; the threshold moves towards its answer by at most
`max_raise` up or `max_lower` down, only when the move is at least `hysteresis`, and never past
[floor, ceiling]. It rises faster than it falls: a threshold left too low breaks the agreement the
target promises while the window still holds the traffic from before a shift, one left too high
only costs the next tiers' work. Each change is logged and shown in tierserve_exit_threshold. Each
replica runs its own; a restart starts from the manifest's (or the configured) threshold.
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

import numpy as np

from shared.contract.policy import guaranteed_threshold
from shared.serving.metrics import TierMetrics

log = logging.getLogger("tierserve.controller")


class ControllerSettings(Protocol):
    """The settings a controller is made from: ForwardingSettings' fields of the same names."""

    agreement_target: float
    audit_delta: float
    controller_floor: float
    controller_ceiling: float
    controller_max_raise: float
    controller_max_lower: float
    controller_every: int
    controller_window: int
    controller_min_samples: int


class ThresholdController:
    @classmethod
    def from_settings(cls, tier: str, metrics: TierMetrics, threshold: float,
                      settings: ControllerSettings) -> ThresholdController:
        """The controller a tier with these settings runs, starting from `threshold`."""
        return cls(tier, metrics, threshold, settings.agreement_target, settings.audit_delta,
                   settings.controller_floor, settings.controller_ceiling, settings.controller_max_raise,
                   settings.controller_max_lower, every=settings.controller_every,
                   window=settings.controller_window, min_samples=settings.controller_min_samples)

    def __init__(self, tier: str, metrics: TierMetrics, threshold: float, target: float, delta: float,
                 floor: float, ceiling: float, max_raise: float = 0.05, max_lower: float = 0.02,
                 hysteresis: float = 0.005, every: int = 200, window: int = 2000, min_samples: int = 300) -> None:
        if not floor <= ceiling:
            raise ValueError(f"controller floor {floor} above its ceiling {ceiling}")
        if max_raise <= 0 or max_lower <= 0:
            raise ValueError(f"controller steps must be positive, got max_raise {max_raise}, max_lower {max_lower}")
        self.tier = tier
        self.metrics = metrics
        self.threshold = min(max(threshold, floor), ceiling)
        self.target = target
        self.delta = delta
        self.floor = floor
        self.ceiling = ceiling
        self.max_raise = max_raise
        self.max_lower = max_lower
        self.hysteresis = hysteresis
        self.every = every
        self.min_samples = min_samples
        self.window: collections.deque[tuple[float, bool]] = collections.deque(maxlen=window)
        self._since_update = 0
        metrics.series.exit_threshold.set(self.threshold)

    def observe(self, confidence: float, agrees: bool) -> None:
        self.window.append((confidence, agrees))
        self._since_update += 1
        if self._since_update >= self.every and len(self.window) >= self.min_samples:
            self._since_update = 0
            self.update()

    def proposal(self) -> float:
        """The guaranteed search's threshold on the window, within [floor, ceiling]."""
        confidence = np.array([c for c, _ in self.window])
        agrees = np.array([a for _, a in self.window])
        found = guaranteed_threshold(confidence, agrees, self.target, self.delta).threshold
        return min(max(found, self.floor), self.ceiling)

    def update(self) -> float:
        """Move the threshold one bounded step towards the proposal; the threshold in force."""
        proposal = self.proposal()
        move = proposal - self.threshold
        if abs(move) < self.hysteresis:
            return self.threshold
        before = self.threshold
        self.threshold = min(max(before + max(-self.max_lower, min(self.max_raise, move)), self.floor), self.ceiling)
        self.metrics.series.exit_threshold.set(self.threshold)
        log.info("%s exit threshold %.4f -> %.4f (the guaranteed search on the last %d audits proposes %.4f for "
                    "agreement %.3f at delta %.2f)", self.tier, before, self.threshold, len(self.window), proposal,
                    self.target, self.delta)
        return self.threshold
