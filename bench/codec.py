"""Compact forwarded tensors: bytes per forwarded sample and accuracy for each forward encoding.

For each `forward_encoding` (set on mobile and edge), the SST-2 dev set runs through the tiers
twice: forced to the cloud (every sample crosses both hops: the strictest test of the encoding,
final-exit accuracy) and at the manifest's thresholds (the system's accuracy). Bytes come from the
tiers' own counters (tierserve_forwarded_bytes_total / tierserve_forwarded_samples_total, both
hops, scraped from their /metrics): the tensor payload put on the wire, hidden state and mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FORCE_CLOUD, base_parser, classify_all, dev_set, load, predictions, scrape, table, tiers
from bench.common import write_result as save
from shared.wire.codec import FLOAT_ENCODINGS

ENCODINGS = tuple(FLOAT_ENCODINGS)  # fp32, fp16, int8 (per token), int8_tensor, int4


def forwarded(cluster: Any) -> tuple[float, float]:
    """Bytes and samples forwarded so far over both hops."""
    total_bytes = total_samples = 0.0
    for tier in ("mobile", "edge"):
        for (name, _), value in scrape(cluster.tiers[tier].metrics_port).items():
            if name == "tierserve_forwarded_bytes_total":
                total_bytes += value
            elif name == "tierserve_forwarded_samples_total":
                total_samples += value
    return total_bytes, total_samples


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        encodings: tuple[str, ...] = ENCODINGS) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, labels = dev_set(manifest, data, limit)
    results: dict[str, dict[str, Any]] = {}
    for encoding in encodings:
        flags = {t: {"forward_encoding": encoding} for t in ("mobile", "edge")}
        with tiers(artifacts, flags) as cluster:
            before = forwarded(cluster)
            final = predictions(classify_all(cluster.entry_address, texts, FORCE_CLOUD))
            after = forwarded(cluster)
            system = predictions(classify_all(cluster.entry_address, texts))
        sent, samples = after[0] - before[0], after[1] - before[1]
        results[encoding] = {"bytes_per_forwarded_sample": sent / samples, "forwarded_samples": samples,
                             "final_accuracy": float(np.mean(final == labels)),
                             "system_accuracy": float(np.mean(system == labels)),
                             "final_predictions": final, "system_predictions": system}
    base = results["fp32"]
    base_final, base_system = base["final_predictions"], base["system_predictions"]
    for r in results.values():
        r["bytes_ratio"] = r["bytes_per_forwarded_sample"] / base["bytes_per_forwarded_sample"]
        r["final_accuracy_change_points"] = (r["final_accuracy"] - base["final_accuracy"]) * 100
        r["system_accuracy_change_points"] = (r["system_accuracy"] - base["system_accuracy"]) * 100
        r["final_agreement_with_fp32"] = float(np.mean(r.pop("final_predictions") == base_final))
        r["system_agreement_with_fp32"] = float(np.mean(r.pop("system_predictions") == base_system))
    print(table(["encoding", "bytes/fwd sample", "x fp32", "final acc", "change pts", "agree",
                 "system acc", "change pts", "agree"],
                [[e, r["bytes_per_forwarded_sample"], r["bytes_ratio"], r["final_accuracy"],
                  r["final_accuracy_change_points"], r["final_agreement_with_fp32"], r["system_accuracy"],
                  r["system_accuracy_change_points"], r["system_agreement_with_fp32"]] for e, r in results.items()]))
    result: dict[str, Any] = {"samples": len(texts), "encodings": results}
    if "int8" in results:
        result["int8_bytes_ratio"] = results["int8"]["bytes_ratio"]
        result["int8_accuracy_change_points"] = results["int8"]["final_accuracy_change_points"]
        result["int8_system_accuracy_change_points"] = results["int8"]["system_accuracy_change_points"]
    if out is not None:
        save(out, "codec", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help="(%(default)s)")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, tuple(args.encodings.split(",")))


if __name__ == "__main__":
    main()
