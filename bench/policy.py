"""Cost-aware (DIMEE-style) thresholds against p_tar thresholds at the same accuracy.

Both policies choose thresholds on the calibration split only. The cost-aware policy takes the
cheapest thresholds within --max-drop points of the final exit; the p_tar policy is swept over
targets, and the cheapest target that is at least as accurate on the calibration split is its
match. Both are then measured on SST-2 dev from the answers of the running tiers.

    python -m bench.policy --artifacts artifacts/default
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    base_parser,
    calibration_probs,
    dev_set,
    exit_probabilities,
    load,
    machine,
    table,
    tiers,
    write_result,
)
from shared.contract.policy import choose_policy, relative_cost, route

P_TAR_SWEEP = np.round(np.arange(0.80, 0.995, 0.005), 3)


def evaluate(probs: list[np.ndarray], labels: np.ndarray, thresholds: list[float],
             split_points: tuple[int, int, int], cost: Any) -> dict[str, float]:
    r = route(probs, thresholds)
    final = float(np.mean(probs[-1].argmax(-1) == labels))
    accuracy = float(np.mean(r.prediction == labels))
    return {"accuracy": accuracy, "accuracy_drop_points": 100 * (final - accuracy),
            "relative_cost": relative_cost(r.fractions(), split_points, cost),
            "exit_fractions": r.fractions().tolist()}


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        max_drop: float = 0.3) -> dict[str, Any]:
    manifest = load(artifacts)
    points, cost = manifest.split_points(), manifest.cost_model
    calib, calib_labels = calibration_probs(artifacts, manifest)
    texts, labels = dev_set(manifest, data, limit)
    with tiers(artifacts) as cluster:
        dev = exit_probabilities(cluster.entry_address, texts)

    cost_taus, cost_spec = choose_policy("cost", calib, calib_labels, points, cost, max_drop_points=max_drop)
    rows = []
    for p_tar in P_TAR_SWEEP:
        taus, spec = choose_policy("p_tar", calib, calib_labels, points, cost, p_tar=(p_tar, p_tar))
        rows.append((float(p_tar), taus, spec))
    as_accurate = [r for r in rows if r[2].expected_accuracy >= cost_spec.expected_accuracy - 1e-12]
    p_tar, p_taus, p_spec = min(as_accurate, key=lambda r: r[2].expected_cost) if as_accurate else rows[-1]

    result: dict[str, Any] = {"machine": machine(), "artifacts": str(artifacts), "samples": len(labels),
                              "cost_model": cost.model_dump(), "max_drop_points": max_drop}
    for name, taus, spec in (("cost_aware", cost_taus, cost_spec), ("p_tar", p_taus, p_spec)):
        result[name] = {"thresholds": taus, "calibration": {"accuracy": spec.expected_accuracy,
                                                           "relative_cost": spec.expected_cost},
                        "dev": evaluate(dev, labels, taus, points, cost)}
    result["p_tar"]["p_tar"] = p_tar
    result["cost_aware_no_more_expensive"] = bool(
        result["cost_aware"]["calibration"]["relative_cost"] <= result["p_tar"]["calibration"]["relative_cost"])

    print(table(["policy", "mobile tau", "edge tau", "calib acc", "calib cost", "dev acc", "dev drop pts",
                 "dev cost"],
                [[name if name != "p_tar" else f"p_tar {p_tar}", *[round(t, 4) for t in result[name]["thresholds"]],
                  result[name]["calibration"]["accuracy"], result[name]["calibration"]["relative_cost"],
                  result[name]["dev"]["accuracy"], result[name]["dev"]["accuracy_drop_points"],
                  result[name]["dev"]["relative_cost"]] for name in ("cost_aware", "p_tar")]))
    if out is not None:
        print(f"wrote {write_result(out, 'policy', result)}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.3, help="cost policy: accuracy drop allowed, points")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.max_drop)


if __name__ == "__main__":
    main()
