"""Which CPUs a tier runs on (Linux): the `cpus` setting, and a split of one machine's CPUs between
the three tiers.

The entry tier sees every sample and works most; the tiers after it see only what the exits before
them let through. When the tiers share a few cores and float, the entry tier's threads are preempted
by the others and migrate between cores, and a sample forwarded past it waits behind new requests.
Given cores of its own, the entry tier keeps its caches and the forwarded samples are computed on
the other cores; the tiers after it share the rest, where their work together fits (on two cores
at c=32 the edge and the cloud kept 0.69 of theirs busy).
bench.peers measures the three tiers so ("pinned") beside floating.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def parse_cpu_list(text: str) -> list[int]:
    """CPU numbers from a Linux CPU list ("0", "0-3", "0,2,4-5"), sorted, each once."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"'{text}' is not a CPU list: expected numbers and ranges like 0,2-3")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"'{part}' in '{text}' is an empty range: write low-high")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pin_process(cpus: Sequence[int], pid: int | None = None) -> None:
    """Run every thread of process `pid` (default: this one), and every thread it starts later, on
    `cpus` only."""
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("pinning a tier to CPUs (the cpus setting) works on Linux only")
    usable = usable_cpus()
    unknown = sorted(set(cpus) - set(usable))
    if unknown:
        raise ValueError(f"cpus {format_cpu_list(unknown)} are not usable here: this process may run on "
                         f"{format_cpu_list(usable)}")
    for thread in os.listdir(f"/proc/{pid or 'self'}/task"):  # one thread's affinity is not enough
        os.sched_setaffinity(int(thread), cpus)


def spread(tiers: Sequence[str], cpus: Sequence[int] | None = None) -> dict[str, str]:
    """A CPU list per tier (chain order, the entry tier first): with fewer CPUs than tiers, the entry
    tier alone on the first CPU and the others sharing the rest (two: 0, 1, 1); with as many or more,
    disjoint blocks, the CPUs left over going to the entry tier; with one CPU, no pinning (an empty dict)."""
    cpus = sorted(cpus if cpus is not None else usable_cpus())
    if len(cpus) < 2 or not tiers:
        return {}
    if len(cpus) < len(tiers):
        rest = format_cpu_list(cpus[1:])
        return {tier: str(cpus[0]) if i == 0 else rest for i, tier in enumerate(tiers)}
    size = len(cpus) // len(tiers)
    first = size + len(cpus) % len(tiers)
    blocks = [cpus[:first]] + [cpus[first + i * size:first + (i + 1) * size] for i in range(len(tiers) - 1)]
    return {tier: format_cpu_list(block) for tier, block in zip(tiers, blocks, strict=True)}
