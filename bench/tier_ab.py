"""A/B of tier settings: three tiers at their defaults (A) against three tiers with some settings
changed (B), both running at once, measured in alternating blocks (A B, B A, ...) so that the
machine's drift hits both alike; the ratio B/A is taken pair by pair, within a block.

`python -m bench.tier_ab --artifacts artifacts/default --set mobile.coalesce_forwards=false
--set edge.coalesce_forwards=false [--levels 32 --blocks 4 --seconds 4]`. One load generator over the
Open Inference Protocol, as bench.peers (perf_analyzer where its chroot exists, else tritonclient),
SST-2 dev, one text per request. Each cell also records the cores each tier kept busy.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import base_parser, dev_set, load, machine, table, tiers, write_result
from bench.peers import (
    DEFAULT_CHROOT,
    cores_used,
    cpu_snapshot,
    perf_analyzer_measure,
    pick_generator,
    tritonclient_measure,
)


def parse_settings(pairs: list[str]) -> dict[str, dict[str, str]]:
    """["mobile.coalesce_forwards=false", ...] -> {"mobile": {"coalesce_forwards": "false"}}."""
    flags: dict[str, dict[str, str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        tier, dot, setting = name.partition(".")
        if not sep or not dot or tier not in ("mobile", "edge", "cloud") or not setting:
            raise SystemExit(f"--set {pair!r}: expected <tier>.<setting>=<value>, e.g. mobile.slice_workers=2")
        flags.setdefault(tier, {})[setting] = value
    return flags


def run(artifacts: Path, changed: dict[str, dict[str, str]], levels: tuple[int, ...] = (32,), blocks: int = 4,
        seconds: float = 4.0, generator: str = "auto", data: str | None = None, limit: int | None = None,
        out: Path | None = None) -> dict[str, Any]:
    texts, labels = dev_set(load(artifacts), data, limit)
    assert isinstance(texts, list), "bench.tier_ab measures a text model"
    generator = pick_generator(generator, DEFAULT_CHROOT)
    measure = (perf_analyzer_measure(DEFAULT_CHROOT, texts, seconds) if generator == "perf_analyzer"
               else tritonclient_measure(texts, [int(x) for x in labels], seconds))
    cells: dict[str, dict[int, list[dict[str, Any]]]] = {"A": {lv: [] for lv in levels}, "B": {lv: [] for lv in levels}}
    with ExitStack() as stack:
        clusters = {"A": stack.enter_context(tiers(artifacts)), "B": stack.enter_context(tiers(artifacts, changed))}
        for block in range(blocks):
            for level in levels:
                for side in ("A", "B") if block % 2 == 0 else ("B", "A"):
                    cluster = clusters[side]
                    before, started = cpu_snapshot(cluster), time.perf_counter()
                    figures = measure(cluster.entry_address, "tierserve", level)
                    figures["cpu_cores"] = cores_used(before, cpu_snapshot(cluster), time.perf_counter() - started)
                    cells[side][level].append(figures)
                    print(f"block {block + 1}/{blocks}  c={level:<3} {side}  {figures['throughput_per_s']:7.1f}/s  "
                          f"p50 {figures['p50_ms']:6.1f} ms  p99 {figures['p99_ms']:6.1f} ms  cores "
                          + " ".join(f"{k} {v:.2f}" for k, v in figures["cpu_cores"].items()), flush=True)
    ratios: dict[int, dict[str, list[float]]] = {}
    rows = []
    for level in levels:
        a, b = cells["A"][level], cells["B"][level]
        ratios[level] = {key: [y[key] / x[key] for x, y in zip(a, b, strict=True)]
                         for key in ("throughput_per_s", "p50_ms", "p99_ms")}
        for side, runs in (("A", a), ("B", b)):
            rows.append([level, side, *(_spread([r[key] for r in runs]) for key in ("throughput_per_s", "p50_ms",
                                                                                     "p99_ms"))])
        rows.append([level, "B/A by block", *(" ".join(f"{v:.3f}" for v in ratios[level][key])
                                               for key in ("throughput_per_s", "p50_ms", "p99_ms"))])
    print(f"A: defaults; B: {changed}")
    print(table(["c", "side", "infer/s median (min..max)", "p50 ms", "p99 ms"], rows))
    result = {"generator": generator, "changed": changed, "levels": list(levels), "blocks": blocks,
              "seconds_per_cell": seconds, "samples": len(texts), "artifacts": str(artifacts), "cells": cells,
              "ratios_b_over_a": ratios, "machine": machine(),
              "command": " ".join(["python -m bench.tier_ab", *sys.argv[1:]])}
    if out is not None:
        write_result(out, "tier_ab", result)
    return result


def _spread(values: list[float]) -> str:
    return f"{float(np.median(values)):.1f} ({min(values):.1f}..{max(values):.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="TIER.SETTING=VALUE",
                        help="a setting of side B (repeat for more)")
    parser.add_argument("--levels", default="32", help="concurrency levels (%(default)s)")
    parser.add_argument("--blocks", type=int, default=4, help="alternating rounds (%(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell (%(default)s)")
    parser.add_argument("--generator", choices=("auto", "perf_analyzer", "tritonclient"), default="auto")
    args = parser.parse_args(argv)
    if not args.set:
        parser.error("give side B's settings with --set, e.g. --set mobile.coalesce_forwards=false")
    run(args.artifacts, parse_settings(args.set), tuple(int(x) for x in args.levels.split(",")), args.blocks,
        args.seconds, args.generator, args.data, args.limit, args.out)


if __name__ == "__main__":
    main()
