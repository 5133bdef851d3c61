"""The call from one tier to the next: a unary Continue, balanced over the next tier's replicas.

- ContinuationClient: one channel to the next tier's target (shared.wire.targets: one address, a
  list, or a DNS name), round_robin over the replicas that report SERVING. The caller's deadline
  travels as the call's gRPC deadline; cancelling the awaiting task cancels the call downstream.
- HOP_FAILURES: the one table of what a failed call's status means here.
- GuardedNextTier: the client behind retries (each retry is a new call, so round_robin sends it to
  another replica where there is one) and a circuit breaker whose changes are logged with the target.
  The breaker counts calls, not attempts: a call whose retry another replica answered is a success.

Every failure raises NextTierError; shared.serving.tier answers those samples degraded with this
tier's own exit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grpc

from shared.errors import TierServeError
from shared.serving.audit import AUDIT_METADATA
from shared.wire.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb2, pb2_grpc
from shared.wire.targets import grpc_target, target_options
from shared.wire.tls import ClientTLS, aio_channel

log = logging.getLogger("tierserve.next_tier")
CONTINUATION_SERVICE = pb2.DESCRIPTOR.services_by_name["Continuation"].full_name
OVERLOAD_MEMORY = 1.0  # seconds a refusal for load or a too-slow answer counts as "the next tier is overloaded"


@dataclass(frozen=True)
class HopFailure:
    kind: str  # a word for the degraded reason and the degraded_total label
    unhealthy: bool  # counts towards opening the breaker (else: a reply from a working tier)
    retry: bool  # another call may succeed (on another replica)


HOP_FAILURES: dict[str, HopFailure] = {
    "UNAVAILABLE": HopFailure("unavailable", unhealthy=True, retry=True),
    "DEADLINE_EXCEEDED": HopFailure("deadline", unhealthy=True, retry=False),
    "RESOURCE_EXHAUSTED": HopFailure("overloaded", unhealthy=True, retry=False),
    "INTERNAL": HopFailure("error", unhealthy=True, retry=False),
    "UNKNOWN": HopFailure("error", unhealthy=True, retry=False),
    "CANCELLED": HopFailure("cancelled", unhealthy=False, retry=False),
}
OTHER_FAILURE = HopFailure("error", unhealthy=False, retry=False)


class NextTierError(TierServeError):
    """The call to the next tier failed.

    next_status: the status name the call ended with (None: no call was made, or its answer was wrong);
    kind: why, in a word (HOP_FAILURES, or circuit_open).
    """

    def __init__(self, message: str, next_status: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.next_status = next_status
        self.failure = HOP_FAILURES.get(next_status or "", OTHER_FAILURE)
        self.kind = kind or self.failure.kind


def reconnect_options(max_backoff_ms: int = 250) -> list[tuple[str, Any]]:
    """Channel options so that a restarted next tier is reconnected to within max_backoff_ms.

    gRPC's defaults back off up to 120 s between connection attempts; between tiers that would
    keep a restarted tier unused for minutes. Calls fail fast (no wait_for_ready) while no replica
    is reachable: the circuit breaker and degraded answers handle that time.
    """
    initial = min(100, max_backoff_ms)
    return [("grpc.initial_reconnect_backoff_ms", initial),
            ("grpc.min_reconnect_backoff_ms", max(1000, initial)),  # also the connect timeout
            ("grpc.max_reconnect_backoff_ms", max_backoff_ms)]


class ContinuationClient:
    """Continue calls to the next tier's replicas (asyncio). Failures raise NextTierError."""

    def __init__(self, target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: ClientTLS | None = None, max_reconnect_backoff_ms: int = 250,
                 reresolve_ms: int = 500) -> None:
        self.address = target
        self.target = grpc_target(target)
        self.channel = aio_channel(
            self.target, [*channel_options(max_message_bytes), *reconnect_options(max_reconnect_backoff_ms),
                          *target_options(CONTINUATION_SERVICE, reresolve_ms)], tls)
        self._continue = pb2_grpc.ContinuationStub(self.channel).Continue

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                             ) -> list[pb2.Answer]:
        """The next tier's answers to `tensors` (encoded: shared.wire.codec.encode_tensors); an
        audit (shared.serving.audit) is marked so, for the next tiers to drop first under load."""
        request = pb2.ContinueRequest(tensors=tensors, request_ids=request_ids, thresholds=thresholds)
        try:
            response = await self._continue(request, timeout=timeout, metadata=(AUDIT_METADATA,) if audit else None)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            raise NextTierError(f"next tier at {self.address} answered {code}: {exc.details()}", code) from exc
        answers = list(response.answers)
        if [a.request_id for a in answers] != list(request_ids):
            raise NextTierError(f"next tier at {self.address} answered other request ids than sent")
        return answers

    async def wait_ready(self, timeout: float) -> bool:
        """Whether a replica of the next tier is connected and SERVING within `timeout` seconds."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        await self.channel.close()


BreakerState = Literal["closed", "open", "half_open"]


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


class HopDeadline:
    """The deadline of a call to the next tier when the caller's own is far off or absent: `factor`
    times the recent time per sample of this hop (95th percentile of the last `window` answered
    calls) times the call's samples, within [floor, ceiling]; the ceiling until `warmup` calls
    have been measured. A partitioned or frozen next tier is so given up on within about a second
    instead of the caller's whole deadline."""

    def __init__(self, ceiling: float, floor: float = 1.0, factor: float = 10.0, window: int = 200,
                 warmup: int = 20) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.factor = factor
        self.warmup = warmup
        self.per_sample: collections.deque[float] = collections.deque(maxlen=window)

    def record(self, seconds: float, samples: int) -> None:
        self.per_sample.append(seconds / max(samples, 1))

    def seconds(self, samples: int) -> float:
        if len(self.per_sample) < self.warmup:
            return self.ceiling
        recent = sorted(self.per_sample)
        p95 = recent[min(len(recent) - 1, int(0.95 * len(recent)))]
        return min(self.ceiling, max(self.floor, self.factor * p95 * max(samples, 1)))


class NextTierClient(Protocol):
    """What GuardedNextTier wraps: ContinuationClient."""

    address: str

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                             ) -> list[pb2.Answer]: ...

    async def close(self) -> None: ...


class GuardedNextTier:
    """The next tier behind retries and a circuit breaker (shared.serving.tier.NextTier)."""

    def __init__(self, client: NextTierClient, name: str, retry: RetryPolicy | None = None,
                 breaker: CircuitBreaker | None = None, min_attempt_seconds: float = 0.002,
                 hop_deadline: HopDeadline | None = None) -> None:
        self.client = client
        self.name = name
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.min_attempt_seconds = min_attempt_seconds
        self.hop_deadline = hop_deadline or HopDeadline(ceiling=10.0)
        self.overloaded_at = -math.inf  # when a call last found the next tier overloaded or too slow

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None, audit: bool = False
                             ) -> list[pb2.Answer]:
        if audit:  # an audit passed on (shared.serving.audit): one try, no verdict on the tier's health
            ceiling = self.hop_deadline.ceiling
            return await self.client.continue_batch(tensors, request_ids, thresholds,
                                                    ceiling if timeout is None else min(timeout, ceiling), audit=True)
        if not self.breaker.allow():
            raise NextTierError(
                f"{self.name} circuit open after {self.breaker.failures} consecutive failures "
                f"(next probe in {self.breaker.retry_in() * 1000:.0f} ms)", kind="circuit_open")
        own = self.hop_deadline.seconds(len(request_ids))
        # a caller's own short deadline passing says nothing of the next tier's health
        caller_bound = timeout is not None and timeout < own
        deadline = time.monotonic() + (own if timeout is None else min(timeout, own))
        retry = 0
        try:
            while True:
                sent = time.monotonic()
                remaining = deadline - sent
                try:
                    answers = await self.client.continue_batch(tensors, request_ids, thresholds, remaining)
                    self.hop_deadline.record(time.monotonic() - sent, len(request_ids))
                    break
                except NextTierError as exc:
                    if exc.failure.retry and retry + 1 < self.retry.attempts:
                        pause = self.retry.delay(retry)
                        if deadline - time.monotonic() - pause >= self.min_attempt_seconds:
                            await asyncio.sleep(pause)
                            retry += 1
                            continue
                    if caller_bound and exc.kind == "deadline":
                        self.breaker.release()
                    else:
                        self._failed(exc)
                    raise self._explained(exc, remaining, retry + 1) from exc
        except NextTierError:
            raise
        except BaseException:
            self.breaker.release()
            raise
        if self.breaker.opened_at is not None:
            log.warning("%s at %s answers again: circuit closed", self.name, self.client.address)
        self.breaker.success()
        return answers

    def overloaded(self) -> bool:
        """The next tier refused for load or answered too late within the last OVERLOAD_MEMORY
        seconds, or its breaker is open."""
        return self.breaker.opened_at is not None or time.monotonic() - self.overloaded_at < OVERLOAD_MEMORY

    def _failed(self, exc: NextTierError) -> None:
        if exc.kind in ("overloaded", "deadline"):
            self.overloaded_at = time.monotonic()
        if not exc.failure.unhealthy:
            self.breaker.release()
            return
        was_open = self.breaker.opened_at is not None
        self.breaker.failure()
        if not was_open and self.breaker.opened_at is not None:
            log.warning("%s at %s failing (%s): circuit open after %d consecutive failures; answering "
                        "degraded until a probe succeeds", self.name, self.client.address, exc,
                        self.breaker.failures)

    def _explained(self, exc: NextTierError, timeout: float | None, attempts: int) -> NextTierError:
        if exc.kind == "deadline":
            budget = "" if timeout is None else f" within {timeout * 1000:.0f} ms"
            return NextTierError(f"{self.name} too slow: no answer{budget}", exc.next_status)
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        return NextTierError(f"{self.name} {exc.kind}{tries}: {exc}", exc.next_status)

    async def close(self) -> None:
        await self.client.close()
