"""Calling the next tier when it may be down, refusing, overloaded or slow.

- RetryPolicy: exponential backoff with full jitter, for UNAVAILABLE only, within the deadline.
- CircuitBreaker: closed -> open after N consecutive failures -> half-open after a cool-down,
  where one probe call decides between closed and open again. While open, no call is made.
- GuardedNextTier: a next tier (shared.client.ContinuationClient) behind both. A failure raises
  NextTierError with `kind` (unavailable, deadline, overloaded, circuit_open, error) and a reason
  naming the tier; shared.serving.tier answers those samples degraded with this tier's own exit.
- InflightLimit: at most N requests in a tier at once; beyond it Overloaded (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from shared.errors import Overloaded
from shared.serving.next_tier import NextTierError
from shared.wire.rpc import pb2

BreakerState = Literal["closed", "open", "half_open"]
# next-tier statuses that say the tier is unhealthy (count towards opening the breaker);
# anything else (e.g. INVALID_ARGUMENT) is a reply from a working tier
UNHEALTHY = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"})
FAILURE_KINDS = {"UNAVAILABLE": "unavailable", "DEADLINE_EXCEEDED": "deadline",
                 "RESOURCE_EXHAUSTED": "overloaded"}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # calls at most, the first included
    base_delay: float = 0.01  # seconds before the first retry (upper bound of its jitter)
    max_delay: float = 0.2
    multiplier: float = 2.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max_delay, base_delay * multiplier**retry)]."""
        ceiling = min(self.max_delay, self.base_delay * self.multiplier ** retry)
        return (rng or random).uniform(0.0, ceiling)


class CircuitBreaker:
    """Per next tier. `allow()` before a call; then exactly one of success/failure/release."""

    def __init__(self, failure_threshold: int = 5, cooldown: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0  # consecutive
        self.opened_at: float | None = None
        self.probing = False  # a half-open probe call is out

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def retry_in(self) -> float:
        """Seconds until a probe may be sent (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
        self.probing = False

    def release(self) -> None:
        """A call ended with no verdict on the tier's health (cancelled, or a non-health error)."""
        self.probing = False


class NextTierClient(Protocol):
    """What GuardedNextTier wraps: shared.client.ContinuationClient."""

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None
                             ) -> list[pb2.Answer]: ...

    async def close(self) -> None: ...


class GuardedNextTier:
    """The next tier behind retries and a circuit breaker (shared.serving.tier.NextTier)."""

    def __init__(self, client: NextTierClient, name: str, retry: RetryPolicy | None = None,
                 breaker: CircuitBreaker | None = None, min_attempt_seconds: float = 0.002) -> None:
        self.client = client
        self.name = name
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.min_attempt_seconds = min_attempt_seconds

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None
                             ) -> list[pb2.Answer]:
        deadline = None if timeout is None else time.monotonic() + timeout
        retry = 0
        while True:
            if not self.breaker.allow():
                raise NextTierError(
                    f"{self.name} circuit open after {self.breaker.failures} consecutive failures "
                    f"(next probe in {self.breaker.retry_in() * 1000:.0f} ms)", "UNAVAILABLE",
                    kind="circuit_open")
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                answers = await self.client.continue_batch(tensors, request_ids, thresholds, remaining)
            except NextTierError as exc:
                status = exc.next_status or exc.code
                if status in UNHEALTHY:
                    self.breaker.failure()
                else:
                    self.breaker.release()
                if status == "UNAVAILABLE" and retry + 1 < self.retry.attempts:
                    pause = self.retry.delay(retry)
                    if deadline is None or deadline - time.monotonic() - pause >= self.min_attempt_seconds:
                        await asyncio.sleep(pause)
                        retry += 1
                        continue
                raise self._failure(exc, status, remaining, retry + 1) from exc
            except BaseException:
                self.breaker.release()
                raise
            self.breaker.success()
            return answers

    def _failure(self, exc: NextTierError, status: str, timeout: float | None,
                 attempts: int) -> NextTierError:
        kind = FAILURE_KINDS.get(status, "error")
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if kind == "deadline":
            budget = "" if timeout is None else f" within {timeout * 1000:.0f} ms"
            return NextTierError(f"{self.name} too slow: no answer{budget}", exc.code, kind=kind,
                                 next_status=status)
        return NextTierError(f"{self.name} {kind}{tries}: {exc}", exc.code, kind=kind,
                             next_status=status)

    async def close(self) -> None:
        await self.client.close()


class InflightLimit:
    """Admission control: at most `limit` requests at once (one event loop: no lock needed)."""

    def __init__(self, limit: int, tier: str) -> None:
        self.limit = limit
        self.tier = tier
        self.current = 0

    def enter(self) -> None:
        """Count a request in, or raise Overloaded at the limit; every enter() needs its leave()."""
        if self.current >= self.limit:
            raise Overloaded(
                f"the {self.tier} tier is at its limit of {self.limit} requests in flight; retry later")
        self.current += 1

    def leave(self) -> None:
        self.current -= 1
