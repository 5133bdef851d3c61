"""Triton's perf_analyzer, unmodified, against the entry tier's Open Inference Protocol: one SST-2
dev sentence per request at concurrency 1, 8 and 32; its own tables, and their figures in JSON.

perf_analyzer's PyPI wheel (perf-analyzer) needs glibc 2.38, newer than Debian 12's, so it runs in a
Debian 13 (trixie) chroot that reaches the tiers on 127.0.0.1. To make one (as root):

    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates trixie DIR <mirror>
    cp /etc/resolv.conf DIR/etc/ && chroot DIR sh -c 'python3 -m venv /opt/pa && /opt/pa/bin/pip install perf-analyzer'

then `python -m bench.perf_analyzer --chroot DIR`. The model's input is a list of texts of dynamic
length (ModelConfig dims [-1]), so each request's shape is given: --shape texts:1.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from bench.common import base_parser, dev_set, load, machine, table, tiers, write_result

LEVELS = (1, 8, 32)
FIGURES = {"throughput_per_s": r"Throughput: ([\d.]+) infer/sec", "p50_us": r"p50 latency: (\d+) usec",
           "p99_us": r"p99 latency: (\d+) usec", "requests": r"Request count: (\d+)"}


def run(artifacts: Path, chroot: Path, data: str | None = None, limit: int | None = 300,
        out: Path | None = None, seconds: float = 5.0) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    (chroot / "tmp" / "tierserve-input.json").write_text(json.dumps({"data": [{"texts": [t]} for t in texts]}))
    results: dict[int, dict[str, Any]] = {}
    with tiers(artifacts) as cluster:
        port = cluster.entry_address.rsplit(":", 1)[1]
        for level in LEVELS:
            done = subprocess.run(
                ["chroot", str(chroot), "/opt/pa/bin/perf_analyzer", "-m", manifest_model_name(), "-i", "grpc",
                 "-u", f"127.0.0.1:{port}", "--input-data", "/tmp/tierserve-input.json", "--shape", "texts:1",
                 "--concurrency-range", str(level), "--measurement-interval", str(int(seconds * 1000))],
                capture_output=True, text=True, timeout=600)
            print(f"== perf_analyzer at concurrency {level} (exit {done.returncode})\n{done.stdout.strip()}")
            found = {name: re.search(pattern, done.stdout) for name, pattern in FIGURES.items()}
            results[level] = {"exit": done.returncode, **{name: float(m.group(1)) if m else None
                                                           for name, m in found.items()}}
    print(table(["concurrency", "infer/s", "p50 ms", "p99 ms"],
                [[level, r["throughput_per_s"], (r["p50_us"] or 0) / 1000, (r["p99_us"] or 0) / 1000]
                 for level, r in results.items()]))
    result = {"by_concurrency": results, "samples": len(texts), "machine": machine()}
    if out is not None:
        write_result(out, "perf_analyzer", result)
    return result


def manifest_model_name() -> str:
    from shared.serving.settings import MobileSettings

    return MobileSettings.model_fields["model_name"].default


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--chroot", type=Path, required=True, help="a Debian 13 root with perf_analyzer in /opt/pa")
    parser.add_argument("--seconds", type=float, default=5.0, help="perf_analyzer's measurement window")
    args = parser.parse_args(argv)
    run(args.artifacts, args.chroot, args.data, args.limit or 300, args.out, args.seconds)


if __name__ == "__main__":
    main()
