"""Overhead of the three gRPC tiers over the floor: requests forced to the cloud, batch 1.

End-to-end latency at the client (real SST-2 dev sentences, one per request, thresholds > 1 so
every sample crosses both hops) versus the same three slices chained in one process with
onnxruntime, with the tiers' thread settings (shared.runner.SliceRunner, 1 intra-op thread) and the
same tokeniser and calibration. Per-hop overhead from the answers' per-tier timings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FORCE_CLOUD, base_parser, dev_set, load, percentiles_ms, table, tiers, write_result
from shared.calibration import softmax
from shared.manifest import Manifest, verified_slice_path
from shared.runner import SliceRunner
from shared.text import TextEncoder

WARMUP = 20


def chain_latencies(artifacts: Path, manifest: Manifest, texts: list[str], threads: int = 1) -> list[float]:
    """Seconds per text through tokeniser + the three slices in this process (the floor)."""
    runners = [SliceRunner(verified_slice_path(artifacts, s), s, threads) for s in manifest.slices]
    encoder = TextEncoder.for_manifest(manifest, artifacts)
    seconds = []
    for i, text in enumerate(texts[:WARMUP] + texts):
        started = time.perf_counter()
        feed = encoder.encode([text]).tensors
        for spec, runner, exit_spec in zip(manifest.slices, runners, manifest.exits, strict=True):
            outputs = runner.run_sync(feed).outputs
            softmax(outputs["logits"], exit_spec.temperature).max(-1)
            feed = {name: outputs.get(source, feed.get(source)) for name, source in spec.forwards.items()}
        if i >= WARMUP:
            seconds.append(time.perf_counter() - started)
    for runner in runners:
        runner.close()
    return seconds


def tier_latencies(address: str, texts: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds per text at the client, and per hop: the RPC time not spent inside the callee."""
    from shared.client import TierClient

    seconds: list[float] = []
    hops: dict[str, list[float]] = {"client_mobile": [], "mobile_edge": [], "edge_cloud": []}
    with TierClient(address) as client:
        for i, text in enumerate(texts[:WARMUP] + texts):
            started = time.perf_counter()
            [answer] = client.classify([text], FORCE_CLOUD)
            elapsed = time.perf_counter() - started
            if i < WARMUP:
                continue
            assert answer.tier == "cloud"
            mobile, edge, cloud = answer.timings
            seconds.append(elapsed)
            hops["client_mobile"].append(elapsed - mobile.server_seconds)
            hops["mobile_edge"].append(mobile.server_seconds - mobile.own_seconds - edge.server_seconds)
            hops["edge_cloud"].append(edge.server_seconds - edge.own_seconds - cloud.server_seconds)
    return seconds, hops


def run(artifacts: Path, data: str | None = None, limit: int | None = 300, out: Path | None = None) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    chain = percentiles_ms(chain_latencies(artifacts, manifest, texts))
    with tiers(artifacts) as cluster:
        seconds, hops = tier_latencies(cluster.entry_address, texts)
    three = percentiles_ms(seconds)
    hop_p50 = {name: float(np.median(values) * 1e3) for name, values in hops.items()}
    result = {
        "samples": len(texts), "chain_ms": chain, "three_tier_ms": three,
        "overhead_ratio": three["p50"] / chain["p50"], "overhead_ratio_p99": three["p99"] / chain["p99"],
        "per_hop_overhead_ms": (three["p50"] - chain["p50"]) / 3, "hop_p50_ms": hop_p50,
    }
    print(table(["system", "p50 ms", "p99 ms", "mean ms"],
                [["in-process chain", chain["p50"], chain["p99"], chain["mean"]],
                 ["three tiers (gRPC)", three["p50"], three["p99"], three["mean"]]]))
    print(f"overhead ratio p50 {result['overhead_ratio']:.3f} (p99 {result['overhead_ratio_p99']:.3f}); "
          f"per hop {result['per_hop_overhead_ms']:.3f} ms; hop p50 (RPC time outside the callee): "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in hop_p50.items()))
    if out is not None:
        write_result(out, "overhead", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(limit=300)
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out)


if __name__ == "__main__":
    main()
