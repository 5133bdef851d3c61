"""Audits: a sample of the samples that reach an early exit also continues to the final exit, off
the answer's path, so that the exit's agreement with the final exit is watched in production.

The agreement metrics count the audited samples the exit answered; a threshold controller
(shared.serving.controller) also learns from the audited samples it forwarded, whose agreement
tells whether a lower threshold would still keep the target.

The caller gets its early answer at once; the audit call runs in the background with thresholds
that let only the final exit answer, marked as an audit (AUDIT_METADATA) so that every tier after
this one drops it first when loaded. Samples are picked at random with chance `fraction`, but a
pick that would take the audits past `fraction` of the samples seen so far is not audited: audits
cost at most that share of the next tiers' work, not only on average. An audit is skipped when this
tier's audits in flight would pass `budget` samples or the tier itself is more than half full; it
never raises, delays or changes an answer. Per exit: audited and agreeing counts, and the agreement
rate's Clopper-Pearson lower bound over the last `window` audits, with probability 1 - delta
(shared.contract.bounds).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from shared.contract.bounds import clopper_pearson_lower
from shared.contract.manifest import TIERS
from shared.serving.controller import ThresholdController
from shared.serving.metrics import TierMetrics
from shared.wire.rpc import pb2

log = logging.getLogger("tierserve.audit")
AUDIT_METADATA = ("tierserve-audit", "1")
FINAL_EXIT_ONLY: dict[str, float] = {tier: 2.0 for tier in TIERS[:-1]}  # above 1: no early exit answers
AUDIT_TIMEOUT = 30.0  # seconds: an audit is not urgent, only bounded


class EarlyExit(NamedTuple):
    """What this exit made of an audited sample."""

    label: int
    confidence: float
    answered: bool  # at or above the threshold: this exit's answer was the caller's


class Send(Protocol):
    async def __call__(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                       thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                       ) -> list[pb2.Answer]: ...



def is_audit(metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    return any(key == AUDIT_METADATA[0] and value == AUDIT_METADATA[1] for key, value in metadata or ())


class Auditor:
    """The audits of one tier's exit. `send` is the next tier's raw Continue call (no retries, no
    breaker: an audit that fails is only not counted)."""

    def __init__(self, tier: str, metrics: TierMetrics, send: Send, fraction: float, budget: int,
                 window: int = 1000, delta: float = 0.1, rng: random.Random | None = None,
                 controller: ThresholdController | None = None) -> None:
        self.tier = tier
        self.send = send
        self.controller = controller
        self.metrics = metrics
        self.fraction = fraction
        self.budget = budget
        self.delta = delta
        self.rng = rng or random.Random()
        self.inflight = 0  # samples
        self.offered = 0  # samples that reached this exit
        self.picked = 0  # of them, audits started
        self.recent: collections.deque[bool] = collections.deque(maxlen=window)
        self._tasks: set[asyncio.Task[None]] = set()

    def pick(self, rows: Sequence[int], load: float) -> list[int]:
        """Which rows to audit; none when the budget or the tier is full (load: the share of the
        tier's admission limit in use)."""
        chosen: list[int] = []
        for row in rows:
            self.offered += 1
            if self.rng.random() < self.fraction and self.picked + len(chosen) + 1 <= self.fraction * self.offered:
                chosen.append(row)
        if chosen and (self.inflight + len(chosen) > self.budget or load > 0.5):
            self.metrics.series.audits_dropped.inc(len(chosen))
            return []
        self.picked += len(chosen)
        return chosen

    def start(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str], early: Sequence[EarlyExit]) -> None:
        """Run the audit of these rows in the background; `early`: what this exit made of each."""
        self.inflight += len(request_ids)
        task = asyncio.get_running_loop().create_task(self._audit(tensors, request_ids, early))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _audit(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                     early: Sequence[EarlyExit]) -> None:
        try:
            answers = await self.send(tensors, request_ids, FINAL_EXIT_ONLY, AUDIT_TIMEOUT, audit=True)
        except Exception as exc:  # the next tier refused or failed: this audit is not counted
            self.metrics.series.audits_dropped.inc(len(request_ids))
            log.debug("audit of %d samples dropped: %s", len(request_ids), exc)
            return
        finally:
            self.inflight -= len(request_ids)
        if any(answer.degraded for answer in answers):  # the final exit did not answer them all
            self.metrics.series.audits_dropped.inc(len(request_ids))
            return
        agreements = [answer.label_index == exit_.label for answer, exit_ in zip(answers, early, strict=True)]
        self.record([agrees for agrees, exit_ in zip(agreements, early, strict=True) if exit_.answered])
        if self.controller is not None:
            try:
                for agrees, exit_ in zip(agreements, early, strict=True):
                    self.controller.observe(exit_.confidence, agrees)
            except Exception:  # a background task: nobody else would see it
                log.exception("the %s threshold controller failed on an audit", self.tier)

    def record(self, agreements: Sequence[bool]) -> None:
        """Count audited answers of this exit (agreeing or not with the final exit)."""
        if not agreements:
            return
        series = self.metrics.series
        series.audits.inc(len(agreements))
        series.audit_agreements.inc(sum(agreements))
        self.recent.extend(agreements)
        series.agreement_lower_bound.set(self.lower_bound())

    def lower_bound(self) -> float:
        """The agreement rate over the window, bounded below with probability 1 - delta (0 without audits)."""
        if not self.recent:
            return 0.0
        return clopper_pearson_lower(sum(self.recent), len(self.recent), self.delta)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
