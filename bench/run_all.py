"""`make bench`: every benchmark against real tiers on 127.0.0.1, then bench/results/summary.json.

`python -m bench.run_all --artifacts artifacts/default [--quick]`; each script also runs alone
(`python -m bench.overhead --help`, ...). --quick shrinks every run (fewer samples, shorter loads).
`--only peers,links` runs those and updates their keys in an existing summary.json (the rest kept).
bench.links needs root (network namespaces) and says so, skipped, without it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench import calibration, codec, links, overhead, peers, policy, throughput, tradeoff
from bench.common import base_parser, machine, write_result

TARGETS = {  # the goals: (key, comparison, bound)
    "per_hop_over_echo": ("<=", 1.5), "throughput_ratio_c32": (">=", 1.5), "cost_reduction": (">=", 0.43),
    "accuracy_drop_points": ("<=", 0.3), "calibration_max_miss": ("<=", 0.02), "int8_bytes_ratio": ("<=", 0.27),
    "int8_accuracy_change_points": ("abs<=", 0.2),
}


def met(value: float | None, comparison: str, bound: float) -> bool | None:
    if value is None:
        return None
    if comparison == "<=":
        return value <= bound
    if comparison == ">=":
        return value >= bound
    return abs(value) <= bound


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs: 300 dev samples, 3 s per load level")
    parser.add_argument("--only", help="comma-separated steps among peers,links: run those, update summary.json")
    args = parser.parse_args(argv)
    if args.only:
        return update(args, [step for step in args.only.split(",") if step], argv)
    limit = args.limit or (300 if args.quick else None)
    started = time.perf_counter()
    parts: dict[str, Any] = {}
    steps = [
        ("overhead", lambda: overhead.run(args.artifacts, args.data, limit, args.out)),
        ("throughput", lambda: throughput.run(args.artifacts, args.data, limit, args.out,
                                              seconds=3.0 if args.quick else 6.0, batching_sweep=not args.quick)),
        ("tradeoff", lambda: tradeoff.run(args.artifacts, args.data, limit, args.out)),
        ("calibration", lambda: calibration.run(args.artifacts, args.data, limit, args.out)),
        ("codec", lambda: codec.run(args.artifacts, args.data, limit, args.out)),
        ("policy", lambda: policy.run(args.artifacts, args.data, limit, args.out)),
        *peer_steps(args, limit),
    ]
    for name, step in steps:
        print(f"\n== {name} ==", flush=True)
        parts[name] = step()
    o, t, tr, c, k, p = (parts[n] for n in ("overhead", "throughput", "tradeoff", "calibration", "codec", "policy"))
    summary: dict[str, Any] = {
        "overhead_ratio": o["overhead_ratio"], "per_hop_overhead_ms": o["per_hop_overhead_ms"],
        "bare_echo_round_trip_ms": o["bare_echo_round_trip_ms"]["p50"], "per_hop_over_echo": o["per_hop_over_echo"],
        "per_hop_over_echo_block_range": [min(o["per_hop_over_echo_by_block"]), max(o["per_hop_over_echo_by_block"])],
        "throughput_ratio_c32": t["throughput_ratio_c32"], "throughput_ratio_by_concurrency": t["ratio_by_concurrency"],
        "cost_reduction": tr["cost_reduction"], "accuracy_drop_points": tr["accuracy_drop_points"],
        "headline_thresholds": tr["thresholds"]["calibrated"], "cloud_only_accuracy": tr["cloud_only_accuracy"],
        "uncalibrated_cost_reduction": tr["uncalibrated_cost_reduction"],
        "uncalibrated_accuracy_drop_points": tr["uncalibrated_accuracy_drop_points"],
        "calibration_max_miss": c["calibration_max_miss"],
        "uncorrected_max_miss": c["max_miss/calibrated/uncorrected"],
        "calibration_max_miss_direct": c["max_miss/calibrated/threshold = p_tar"],
        "uncalibrated_max_miss_direct": c["max_miss/uncalibrated/threshold = p_tar"],
        "early_exit_share_guaranteed_vs_uncorrected": c["coverage"],
        "int8_bytes_ratio": k["int8_bytes_ratio"], "int8_accuracy_change_points": k["int8_accuracy_change_points"],
        "int8_system_accuracy_change_points": k["int8_system_accuracy_change_points"],
        "cost_policy_vs_p_tar": {name: p[name]["dev"] | {"calibration": p[name]["calibration"]}
                                 for name in ("cost_aware", "p_tar")},
        "cost_policy_no_more_expensive": p["cost_aware_no_more_expensive"],
        **peer_headlines(parts),
        "machine": machine(), "artifacts": str(args.artifacts), "samples_limit": limit, "quick": args.quick,
        "command": " ".join(["python -m bench.run_all", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": time.perf_counter() - started,
    }
    summary["targets"] = {key: {"value": summary[key], "goal": f"{cmp} {bound}", "met": met(summary[key], cmp, bound)}
                          for key, (cmp, bound) in TARGETS.items()}
    path = write_result(args.out, "summary", summary)
    print("\n== summary ==")
    print(json.dumps({k: v for k, v in summary.items() if k != "targets"}, indent=2, default=str))
    for key, target in summary["targets"].items():
        print(f"{key:<30} {target['value']!s:<24} goal {target['goal']:<10} met: {target['met']}")
    print(f"wrote {path} in {summary['seconds']:.0f} s")
    return 0


def peer_steps(args: Any, limit: int | None) -> list[tuple[str, Any]]:
    """bench.peers (KServe and tierserve, one load generator) and bench.links (shaped links; root only)."""
    seconds, blocks = (1.5, 2) if args.quick else (2.0, 3)
    return [("peers", lambda: peers.run(args.artifacts, args.data, limit, args.out, seconds, blocks)),
            ("links", lambda: links.run(args.artifacts, args.data, limit, args.out))]


def peer_headlines(parts: dict[str, Any]) -> dict[str, Any]:
    """summary.json's keys for peers and links (links: None where it was skipped)."""
    return {"peers": peers.headline(parts["peers"]) if parts.get("peers") else None,
            "links": links.headline(parts["links"]) if parts.get("links") else None}


def update(args: Any, only: list[str], argv: list[str] | None) -> int:
    """Run only `only` (of peers, links) and replace their keys in summary.json, keeping the others."""
    unknown = set(only) - {"peers", "links"}
    if unknown:
        raise SystemExit(f"--only takes peers and/or links, not {', '.join(sorted(unknown))}")
    path = args.out / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    parts = {name: step() for name, step in peer_steps(args, args.limit or (300 if args.quick else None))
             if name in only}
    summary |= {k: v for k, v in peer_headlines(parts).items() if k in only}
    summary[f"command_{'_'.join(only)}"] = " ".join(["python -m bench.run_all", *(argv if argv is not None
                                                                                   else sys.argv[1:])])
    write_result(args.out, "summary", summary)
    print(json.dumps({k: summary[k] for k in only}, indent=2, default=str))
    print(f"updated {path}: {', '.join(only)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
