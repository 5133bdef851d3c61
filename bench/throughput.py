"""Throughput: requests/s of the three-tier system at its default thresholds versus one cloud-only
tier serving the whole model through the same server code, at concurrency 1, 8 and 32.

Each request is one SST-2 dev sentence; `concurrency` asyncio clients send back to back for
`--seconds` after a warm-up. The cloud-only tier is the entry-tier server (`python -m mobile_node`)
on a whole-model artifact (bench.whole_model: the three slices joined into one ONNX graph, the
final exit, threshold 0). Both sides get the same tuning, and the ratio at each level is the best
three-tier run over the best cloud-only run: the defaults (1 intra-op thread, 1 slice worker per
tier), or, at the tier that does most of the work (the mobile tier, which answers most requests;
the cloud-only tier, which answers all), as many intra-op threads or as many slice workers
(batches side by side) as there are cores. The sweep adds batching off and a 2 ms queue delay.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import base_parser, dev_set, load, machine, table, tiers, write_result
from bench.whole_model import assemble

LEVELS = (1, 8, 32)


async def _load(address: str, texts: list[str], concurrency: int, seconds: float, warmup: float
                ) -> tuple[int, float, Counter[str]]:
    from shared.client import AsyncTierClient

    source = itertools.cycle(texts)
    done, exits = 0, Counter[str]()
    counting = False
    async with AsyncTierClient(address, timeout=60) as client:
        async def worker(stop_at: float) -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                [answer] = await client.classify([next(source)])
                if counting:
                    done += 1
                    exits[answer.tier] += 1

        start = time.perf_counter()
        warm = asyncio.gather(*(worker(start + warmup + seconds) for _ in range(concurrency)))
        await asyncio.sleep(warmup)
        counting, measured_from = True, time.perf_counter()
        await warm
        elapsed = time.perf_counter() - measured_from
    return done, elapsed, exits


def measure(address: str, texts: list[str], levels: tuple[int, ...], seconds: float, warmup: float
            ) -> dict[int, dict[str, Any]]:
    results = {}
    for level in levels:
        done, elapsed, exits = asyncio.run(_load(address, texts, level, seconds, warmup))
        results[level] = {"requests": done, "seconds": elapsed, "rps": done / elapsed,
                          "exits": {k: v / max(1, done) for k, v in sorted(exits.items())}}
    return results


@contextmanager
def cloud_only(whole: Path, flags: Mapping[str, object]) -> Iterator[str]:
    from shared.tools.processes import start_tier, wait_until_serving

    with tempfile.TemporaryDirectory(prefix="tierserve-cloud-only-") as logs:
        tier = start_tier("mobile", whole, Path(logs), next_address="127.0.0.1:9",
                          flags=flags)
        try:
            wait_until_serving([tier])
            yield tier.address
        finally:
            tier.stop()


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        seconds: float = 6.0, warmup: float = 1.5, levels: tuple[int, ...] = LEVELS,
        batching_sweep: bool = True) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    whole = assemble(artifacts, artifacts.with_name(artifacts.name + "-whole"))
    cores = machine()["cores"] or 1
    systems: dict[str, tuple[str, Mapping[str, Any]]] = {"three-tier": ("tiers", {})}
    tuned = {f"{cores} threads": {"onnx_threads": cores}, f"{cores} workers": {"slice_workers": cores}}
    if cores > 1:
        systems |= {f"three-tier, mobile {name}": ("tiers", {"mobile": f}) for name, f in tuned.items()}
    if batching_sweep:
        no_batching = {t: {"max_batch_size": 1} for t in ("mobile", "edge", "cloud")}
        delay = {t: {"max_queue_delay_ms": 2} for t in ("mobile", "edge", "cloud")}
        systems |= {"three-tier, batching off": ("tiers", no_batching),
                    "three-tier, queue delay 2 ms": ("tiers", delay)}
    systems["cloud-only, 1 thread"] = ("whole", {"onnx_threads": 1})
    if cores > 1:
        systems |= {f"cloud-only, {name}": ("whole", f) for name, f in tuned.items()}
    if batching_sweep:
        systems["cloud-only, 1 thread, batching off"] = ("whole", {"onnx_threads": 1, "max_batch_size": 1})
    measured: dict[str, dict[int, dict[str, Any]]] = {}
    for name, (kind, flags) in systems.items():
        print(f"throughput: {name} ...", flush=True)
        if kind == "tiers":
            with tiers(artifacts, flags) as cluster:
                measured[name] = measure(cluster.entry_address, texts, levels, seconds, warmup)
        else:
            with cloud_only(whole, flags) as address:
                measured[name] = measure(address, texts, levels, seconds, warmup)
    ratios, best = {}, {}
    for level in levels:
        best[level] = {side: max((n for n in measured if n.startswith(side)), key=lambda n: measured[n][level]["rps"])
                       for side in ("three-tier", "cloud-only")}
        ratios[level] = (measured[best[level]["three-tier"]][level]["rps"]
                         / measured[best[level]["cloud-only"]][level]["rps"])
    rows = [[name] + [m[level]["rps"] for level in levels] for name, m in measured.items()]
    rows.append(["ratio best three-tier / best cloud-only"] + [ratios[level] for level in levels])
    print(table(["system (requests/s)"] + [f"c={level}" for level in levels], rows))
    last = levels[-1]
    print(f"best at c={last}: {best[last]['three-tier']} vs {best[last]['cloud-only']}; three-tier exits: "
          + ", ".join(f"{k} {v:.2f}" for k, v in measured[best[last]["three-tier"]][last]["exits"].items()))
    result = {"seconds_per_level": seconds, "levels": list(levels), "systems": measured,
              "ratio_by_concurrency": ratios, "throughput_ratio_c32": ratios.get(32), "best": best,
              "cloud_only_artifact": str(whole),
              "ratio": "at each level, the best three-tier run over the best cloud-only run (each: defaults, or "
                       "all cores as threads or as slice workers at the tier answering most requests; batching "
                       "on / off)"}
    if out is not None:
        write_result(out, "throughput", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per concurrency level")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels (%(default)s)")
    parser.add_argument("--no-batching-sweep", action="store_true",
                        help="skip the three-tier runs with batching off / queue delay 2 ms")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.seconds,
        levels=tuple(int(x) for x in args.levels.split(",")), batching_sweep=not args.no_batching_sweep)


if __name__ == "__main__":
    main()
