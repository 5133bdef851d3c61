"""Soak: many requests of mixed sizes through the three tiers, each tier's resident memory every
CHECKPOINT requests, and every request accounted for.

The tiers at their default thresholds; `--concurrency` asyncio clients send SST-2 dev sentences in
requests of 1, 4, 16 or 32 texts (SIZES, seeded), each with a deadline. Every request ends answered
in full, answered with some answers degraded, or failed with a status; `lost` counts those that
ended any other way (none may). Memory is the tiers' own process_resident_memory_bytes. Goal: growth
after warm-up (from the first checkpoint to the last) < 10% per tier, 0 lost.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import base_parser, dev_set, load, machine, scrape, table, tiers, write_result
from shared.client import AsyncTierClient
from shared.contract.manifest import TIERS

SIZES = {1: 0.7, 4: 0.2, 16: 0.08, 32: 0.02}  # texts per request: probability
CHECKPOINT = 10_000
DEADLINE = 10.0


def _rss_mb(cluster: Any) -> dict[str, float]:
    return {tier: scrape(cluster.tiers[tier].metrics_port)[("process_resident_memory_bytes", ())] / 2**20
            for tier in TIERS}


async def _soak(cluster: Any, texts: list[str], requests: int, concurrency: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    sizes = rng.choice(list(SIZES), size=requests, p=list(SIZES.values()))
    source = itertools.cycle(texts)
    outcomes: Counter[str] = Counter()
    memory: list[dict[str, Any]] = []
    sent = 0
    samples = 0
    started = time.perf_counter()
    async with AsyncTierClient(cluster.entry_address, timeout=DEADLINE) as client:
        async def worker() -> None:
            nonlocal sent, samples
            while sent < requests:
                size = int(sizes[sent])
                sent += 1
                if sent % CHECKPOINT == 0 and sent < requests:  # the last one is taken after the run
                    memory.append({"requests": sent, "seconds": time.perf_counter() - started,
                                   "rss_mb": _rss_mb(cluster)})
                batch = [next(source) for _ in range(size)]
                try:
                    answers = await client.classify(batch)
                except grpc.aio.AioRpcError as exc:
                    outcomes[f"failed {exc.code().name}"] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 (anything else is a lost request)
                    outcomes[f"lost {type(exc).__name__}"] += 1
                    continue
                if len(answers) != size:
                    outcomes["lost (answers missing)"] += 1
                    continue
                samples += size
                outcomes["degraded" if any(a.degraded for a in answers) else "full"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"outcomes": dict(outcomes), "memory": memory, "samples": samples,
            "seconds": time.perf_counter() - started}


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        requests: int = 100_000, concurrency: int = 8) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    with tiers(artifacts) as cluster:
        soaked = asyncio.run(_soak(cluster, texts, requests, concurrency))
        final = _rss_mb(cluster)
    memory = soaked["memory"] + [{"requests": requests, "seconds": soaked["seconds"], "rss_mb": final}]
    first = memory[0]["rss_mb"]
    growth = {tier: final[tier] / first[tier] - 1 for tier in TIERS}
    outcomes = soaked["outcomes"]
    lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
    accounted = sum(outcomes.values())
    print(table(["requests", "seconds", *(f"{t} RSS MB" for t in TIERS)],
                [[m["requests"], m["seconds"], *(m["rss_mb"][t] for t in TIERS)] for m in memory]))
    print(f"{requests} requests ({soaked['samples']} samples answered) in {soaked['seconds']:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
          + f"; lost {lost}; RSS growth after warm-up: "
          + ", ".join(f"{t} {100 * g:+.1f}%" for t, g in growth.items()) + " (goal < 10%, 0 lost)")
    result = {"requests": requests, "accounted": accounted, "concurrency": concurrency, "sizes": SIZES,
              "outcomes": outcomes, "lost": lost, "memory": memory, "rss_growth_after_warmup": growth,
              "seconds": soaked["seconds"], "samples": soaked["samples"], "machine": machine()}
    if out is not None:
        write_result(out, "soak", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
