"""Drive the entry tier at a fixed concurrency, optionally killing and restarting a tier mid-run.

Used by bench/fault.py (the load and fault tool) and tests/test_faults.py. Every request ends as
one of: full (answered, nothing degraded), degraded (answered, at least one answer flagged
degraded) or failed (an RPC error: its status code is kept). The resume time is the time from a
killed tier's restart to the first answer that went through it again.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from shared.client import AsyncTierClient
from shared.tools.processes import TierCluster
from shared.wire.tls import ClientTLS


@dataclass
class RequestRecord:
    started: float  # time.monotonic()
    finished: float
    outcome: str  # full, degraded, failed
    code: str = "OK"  # the status of a failed request
    tiers: frozenset[str] = frozenset()  # tiers that took part in some answer
    reasons: tuple[str, ...] = ()  # degraded reasons

    @property
    def latency(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class FaultPlan:
    """Kill `tier` (SIGKILL) once `kill_after` requests were sent; restart it `down_seconds` later.

    tail_requests: go on past the planned count until this many requests were sent after the
    restarted tier is SERVING again (so that a slow restart still shows the recovery).
    """

    tier: str
    kill_after: int
    down_seconds: float = 1.0
    tail_requests: int = 0


@dataclass
class FaultEvents:
    killed_at: float | None = None
    restarted_at: float | None = None  # the new process was started
    serving_at: float | None = None  # ... and reported SERVING
    serving_index: int | None = None  # the number of requests sent by then


@dataclass
class LoadResult:
    records: list[RequestRecord]
    wall_seconds: float
    events: FaultEvents = field(default_factory=FaultEvents)
    fault: FaultPlan | None = None

    def summary(self) -> dict[str, object]:
        outcomes = Counter(r.outcome for r in self.records)
        latencies = np.array([r.latency for r in self.records]) * 1000
        failures = Counter(r.code for r in self.records if r.outcome == "failed")
        reasons = Counter(re.sub(r"\d+", "N", reason.split(":")[0]) for r in self.records for reason in r.reasons)
        summary: dict[str, object] = {
            "requests": len(self.records),
            "answered": outcomes["full"] + outcomes["degraded"],
            "full": outcomes["full"],
            "degraded": outcomes["degraded"],
            "failed": outcomes["failed"],
            "failed_by_code": dict(failures),
            "degraded_reasons": dict(reasons.most_common(8)),
            "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99),
            "max_ms": float(latencies.max()) if len(latencies) else None,
            "wall_s": self.wall_seconds,
            "requests_per_s": len(self.records) / self.wall_seconds if self.wall_seconds else None,
        }
        if self.fault is not None:
            summary["killed_tier"] = self.fault.tier
            summary["down_s"] = self.fault.down_seconds
            summary["resume_after_restart_s"] = self.resume_after(self.events.restarted_at)
            summary["resume_after_serving_s"] = self.resume_after(self.events.serving_at)
            if self.events.restarted_at and self.events.serving_at:
                summary["restart_to_serving_s"] = self.events.serving_at - self.events.restarted_at
        return summary

    def resume_after(self, moment: float | None) -> float | None:
        """Seconds from `moment` to the first answer, finished after it, that passed the killed tier."""
        if moment is None or self.fault is None:
            return None
        passed = [r.finished for r in self.records
                  if r.finished >= moment and r.outcome != "failed" and self.fault.tier in r.tiers
                  and not _failed_at(r, self.fault.tier)]
        return min(passed) - moment if passed else None


def _failed_at(record: RequestRecord, tier: str) -> bool:
    # degraded because `tier` failed (reasons name the failed tier first); a request degraded by
    # the failure of a later tier still went through `tier`
    return any(reason.startswith(f"{tier} ") for reason in record.reasons)


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def drive(address: str, texts: Sequence[str], requests: int, concurrency: int,
                deadline: float | None = None, thresholds: Mapping[str, float] | None = None,
                texts_per_request: int = 1, tls: ClientTLS | None = None,
                cluster: TierCluster | None = None, fault: FaultPlan | None = None,
                rate: float | None = None) -> LoadResult:
    """Send `requests` Classify calls, `concurrency` at a time; apply `fault` to `cluster` mid-run.

    rate: requests per second at most (request i starts no earlier than i / rate seconds in),
    so that a run lasts long enough to span a fault; None: as fast as the tiers answer.
    """
    records: list[RequestRecord] = []
    events = FaultEvents()
    fault_task: asyncio.Task[None] | None = None
    sent = 0

    def next_index() -> int | None:
        nonlocal sent
        if sent >= requests and not _tail_missing():
            return None
        sent += 1
        return sent - 1

    def _tail_missing() -> bool:
        if fault is None or not fault.tail_requests or sent >= 20 * requests:
            return False
        if fault_task is not None and fault_task.done() and events.serving_index is None:
            return False  # the restart failed: nothing to wait for
        return events.serving_index is None or sent - events.serving_index < fault.tail_requests

    async def inject() -> None:
        assert fault is not None and cluster is not None
        await asyncio.to_thread(cluster.tiers[fault.tier].kill)
        events.killed_at = time.monotonic()
        await asyncio.sleep(fault.down_seconds)
        events.restarted_at = time.monotonic()
        await asyncio.to_thread(cluster.restart, fault.tier)
        events.serving_at = time.monotonic()
        events.serving_index = sent

    async with AsyncTierClient(address, timeout=deadline or 30.0, tls=tls) as client:
        async def worker() -> None:
            nonlocal fault_task
            while (i := next_index()) is not None:
                if rate:
                    await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                if fault is not None and i == fault.kill_after:
                    fault_task = asyncio.create_task(inject())
                batch = [texts[(i * texts_per_request + k) % len(texts)] for k in range(texts_per_request)]
                records.append(await _one(client, batch, thresholds, deadline, f"load-{i}"))

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - started
        if fault_task is not None:
            await fault_task
    return LoadResult(records, wall, events, fault)


async def _one(client: AsyncTierClient, texts: list[str], thresholds: Mapping[str, float] | None,
               deadline: float | None, request_id: str) -> RequestRecord:
    started = time.monotonic()
    try:
        answers = await client.classify(texts, thresholds, timeout=deadline, request_id=request_id)
    except grpc.aio.AioRpcError as exc:
        return RequestRecord(started, time.monotonic(), "failed", exc.code().name)
    finished = time.monotonic()
    reasons = tuple(a.degraded_reason for a in answers if a.degraded)
    tiers = frozenset(t.tier for a in answers for t in a.timings)
    return RequestRecord(started, finished, "degraded" if reasons else "full", "OK", tiers, reasons)
