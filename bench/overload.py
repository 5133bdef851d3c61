"""Goodput under overload: samples answered in time per second at 1x, 4x and 10x the saturating
concurrency, with requests of 1 and of 32 texts, and how fast the tiers refuse what they cannot take.

The three tiers at their default thresholds (and default admission: max_inflight_samples). Each of
`concurrency` asyncio clients sends back to back with a deadline (DEADLINE); a request refused with
RESOURCE_EXHAUSTED is retried after REJECTED_PAUSE, as a client should. Goodput counts the samples
of requests answered within their deadline. The saturating concurrency is the smallest level of a
sweep (1, 2, 4, ...) within 90% of the sweep's best goodput. Goals: goodput at 10x >= 80% of the
best, refusals p99 < 20 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from bench.common import base_parser, dev_set, load, machine, percentiles_ms, table, tiers, write_result
from shared.client import AsyncTierClient

DEADLINE = 5.0
REJECTED_PAUSE = 0.05
SWEEP = (1, 2, 4, 8, 16)
MULTIPLES = (1, 4, 10)
BATCHES = (1, 32)


async def _drive(address: str, texts: list[str], batch: int, concurrency: int, seconds: float, warmup: float
                 ) -> dict[str, Any]:
    source = itertools.cycle(texts)
    answered_samples, outcomes = 0, Counter[str]()
    refusals: list[float] = []
    latencies: list[float] = []
    counting = False
    async with AsyncTierClient(address, timeout=DEADLINE) as client:
        async def worker(stop_at: float) -> None:
            nonlocal answered_samples
            while time.perf_counter() < stop_at:
                request = [next(source) for _ in range(batch)]
                started = time.perf_counter()
                try:
                    await client.classify(request, timeout=DEADLINE)
                except grpc.aio.AioRpcError as exc:
                    elapsed = time.perf_counter() - started
                    if counting:
                        outcomes[exc.code().name] += 1
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            refusals.append(elapsed)
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(REJECTED_PAUSE)
                    continue
                if counting:
                    outcomes["OK"] += 1
                    answered_samples += batch
                    latencies.append(time.perf_counter() - started)

        start = time.perf_counter()
        running = asyncio.gather(*(worker(start + warmup + seconds) for _ in range(concurrency)))
        await asyncio.sleep(warmup)
        counting, measured_from = True, time.perf_counter()
        await running
        elapsed = time.perf_counter() - measured_from
    return {"concurrency": concurrency, "batch": batch, "seconds": elapsed,
            "goodput_samples_per_s": answered_samples / elapsed, "outcomes": dict(outcomes),
            "answer_ms": percentiles_ms(latencies) if latencies else None,
            "refusal_ms": percentiles_ms(refusals) if refusals else None}


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        seconds: float = 8.0, warmup: float = 2.0) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    by_batch: dict[int, Any] = {}
    rows = []
    with tiers(artifacts) as cluster:
        address = cluster.entry_address
        for batch in BATCHES:
            sweep = [asyncio.run(_drive(address, texts, batch, c, seconds / 2, warmup)) for c in SWEEP]
            best = max(r["goodput_samples_per_s"] for r in sweep)
            saturating = next(r["concurrency"] for r in sweep if r["goodput_samples_per_s"] >= 0.9 * best)
            levels = [asyncio.run(_drive(address, texts, batch, m * saturating, seconds, warmup)) for m in MULTIPLES]
            best = max(best, *(r["goodput_samples_per_s"] for r in levels))
            at_10x = levels[-1]
            refused = [r["refusal_ms"]["p99"] for r in levels if r["refusal_ms"]]
            by_batch[batch] = {"sweep": sweep, "saturating_concurrency": saturating, "levels": levels,
                               "best_goodput": best, "goodput_10x_over_best": at_10x["goodput_samples_per_s"] / best,
                               "refusal_p99_ms": max(refused) if refused else None}
            for r in levels:
                rows.append([batch, r["concurrency"], f"{r['concurrency'] // saturating}x",
                             r["goodput_samples_per_s"], r["goodput_samples_per_s"] / best,
                             r["answer_ms"]["p99"] if r["answer_ms"] else None,
                             sum(v for k, v in r["outcomes"].items() if k != "OK"),
                             r["refusal_ms"]["p50"] if r["refusal_ms"] else None,
                             r["refusal_ms"]["p99"] if r["refusal_ms"] else None,
                             ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))])
    print(table(["texts/request", "concurrency", "load", "goodput samples/s", "of best", "answer p99 ms",
                 "not answered", "refusal p50 ms", "refusal p99 ms", "outcomes"], rows))
    result = {"by_batch": by_batch, "deadline_s": DEADLINE, "rejected_pause_s": REJECTED_PAUSE,
              "goodput_10x_over_best_min": min(b["goodput_10x_over_best"] for b in by_batch.values()),
              "refusal_p99_ms_max": max((b["refusal_p99_ms"] for b in by_batch.values()
                                         if b["refusal_p99_ms"] is not None), default=None),
              "samples": len(texts), "machine": machine()}
    ratios = ", ".join(f"batch {b}: {v['goodput_10x_over_best']:.2f}" for b, v in by_batch.items())
    print(f"goodput at 10x / best: {ratios} (goal >= 0.8); refusal p99: {result['refusal_p99_ms_max']} ms (goal < 20)")
    if out is not None:
        write_result(out, "overload", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per load level")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.seconds)


if __name__ == "__main__":
    main()
