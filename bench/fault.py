"""The load and fault tool: drive the three tiers at a concurrency, kill and restart one mid-run.

    python -m bench.fault --requests 2000 --concurrency 16 --kill edge
    python -m bench.fault --requests 1000 --concurrency 4 --deadline-ms 50 --slow-next-ms 100

Starts mobile, edge and cloud on 127.0.0.1 (shared.tools.processes), sends Classify requests with real
texts (SST-2 dev, else generated ones), optionally SIGKILLs a tier after --kill-at of the requests
and restarts it on the same address --down-s later, and reports answered (full / degraded) and
failed requests, latency p50/p99 and the time from the restart to the first answer through the
restarted tier. Prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/fault.py` as well as `python -m bench.fault`
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import machine  # noqa: E402
from shared.contract.manifest import TIERS  # noqa: E402
from shared.errors import BuildInputError  # noqa: E402
from shared.tools.loadgen import FaultPlan, drive  # noqa: E402
from shared.tools.processes import TierCluster  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "sst2"
RESULTS = REPO_ROOT / "bench" / "results"


def load_texts(data: Path | None, limit: int = 5000) -> tuple[list[str], str]:
    """SST-2 dev sentences (or any dataset shared.data.text reads), else generated sentences."""
    from shared.data.text import load_split

    if data is not None and data.exists():
        try:
            return load_split(data).texts[:limit], str(data)
        except BuildInputError as exc:
            print(f"cannot read {data} ({exc}); using generated texts", file=sys.stderr)
    rng = random.Random(0)
    words = ["a", "the", "film", "plot", "story", "good", "bad", "dull", "great", "moving", "weak",
             "acting", "was", "is", "not", "very", "quite", "charming", "boring", "lovely"]
    return [" ".join(rng.choices(words, k=rng.randint(3, 25))) for _ in range(limit)], "generated"


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} '{item}' is not NAME=VALUE")
        pairs[name] = value
    return pairs


def tier_flags(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    flags: dict[str, dict[str, object]] = {tier: {} for tier in TIERS}
    for key, value in parse_pairs(args.tier_flag, "--tier-flag").items():
        tier, _, name = key.partition(".")
        if tier not in flags or not name:
            raise SystemExit(f"--tier-flag {key}: use TIER.SETTING=VALUE, TIER one of {TIERS}")
        flags[tier][name] = value
    if args.slow_next_ms:
        flags[args.slow_tier]["inject_delay_ms"] = args.slow_next_ms
    return flags


def table(rows: dict[str, object]) -> str:
    def show(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return "-" if value is None else str(value)

    width = max(len(k) for k in rows)
    return "\n".join(f"{key.ljust(width)}  {show(value)}" for key, value in rows.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fault", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts" / "default")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="texts to send (SST-2 dev)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None,
                        help="requests per second at most (default: as fast as answered at --concurrency)")
    parser.add_argument("--deadline-ms", type=float, default=5000.0, help="the client's deadline per request")
    parser.add_argument("--kill", choices=TIERS[1:], help="SIGKILL this tier mid-run, then restart it")
    parser.add_argument("--kill-at", type=float, default=0.3, help="share of requests sent before the kill")
    parser.add_argument("--down-s", type=float, default=1.0, help="seconds the killed tier stays down")
    parser.add_argument("--tail-requests", type=int, default=0,
                        help="go on until this many requests were sent after the restarted tier is SERVING")
    parser.add_argument("--slow-next-ms", type=float, default=0.0,
                        help="artificial delay of --slow-tier before it answers Continue (test hook)")
    parser.add_argument("--slow-tier", choices=TIERS[1:], default="edge")
    parser.add_argument("--threshold", action="append", default=[], metavar="TIER=VALUE",
                        help="per-request threshold override, e.g. mobile=0.9 (default: the manifest's)")
    parser.add_argument("--tier-flag", action="append", default=[], metavar="TIER.SETTING=VALUE",
                        help="extra tier setting, e.g. edge.breaker_cooldown_s=1")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    if not (args.artifacts / "manifest.json").is_file():
        parser.error(f"no built model at {args.artifacts} (build one: `tierserve build --out ...`)")

    texts, source = load_texts(args.data)
    thresholds = {k: float(v) for k, v in parse_pairs(args.threshold, "--threshold").items()}
    deadline = args.deadline_ms / 1000 if args.deadline_ms else None
    fault: FaultPlan | None = FaultPlan(args.kill, int(args.requests * args.kill_at), args.down_s, args.tail_requests)
    fault = fault if args.kill else None

    with TierCluster(args.artifacts, flags=tier_flags(args)) as cluster:
        # warm up (first runs of each slice are slower), then measure
        asyncio.run(drive(cluster.entry_address, texts, 50, min(4, args.concurrency), deadline=30.0,
                          thresholds=thresholds))
        result = asyncio.run(drive(
            cluster.entry_address, texts, args.requests, args.concurrency, deadline, thresholds,
            args.texts_per_request, cluster=cluster, fault=fault, rate=args.rate))

    summary = result.summary()
    report = {
        "command": " ".join(["python -m bench.fault", *(argv if argv is not None else sys.argv[1:])]),
        "artifacts": str(args.artifacts), "texts": source, "concurrency": args.concurrency,
        "texts_per_request": args.texts_per_request, "rate": args.rate, "deadline_ms": args.deadline_ms,
        "slow_next_ms": args.slow_next_ms, "slow_tier": args.slow_tier if args.slow_next_ms else None,
        "thresholds": thresholds, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **summary,
    }
    print(table({k: v for k, v in report.items() if not isinstance(v, dict | list)}))
    for key in ("failed_by_code", "degraded_reasons"):
        if report[key]:
            print(f"{key}: {json.dumps(report[key])}")
    out = args.out or RESULTS / f"fault-{args.kill or 'none'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
