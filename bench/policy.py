"""Cost-aware (DIMEE-style) thresholds against p_tar thresholds at the same accuracy.

Every policy chooses thresholds on the calibration split only. The cost-aware policy takes the
cheapest thresholds whose drop against the final exit is within --max-drop points with
probability >= 1 - delta (the product's default); "cost, uncorrected" is the search it replaced
with no margin: the cheapest pair of a 60 x 60 threshold grid whose drop measured on the
calibration split is within budget (what the guarantee costs, and what it protects against). The
p_tar policy is swept over targets, and the cheapest target that is at least as accurate on the
calibration split is its match. "cost, 4 paths" is the guaranteed search over four threshold
paths at delta / 4 each (the default before one fixed path), and "cost, chosen on dev" the cheapest
grid pair whose drop on the evaluation split itself is within budget: no policy can choose it, it
shows how far the model allows. All are then measured on SST-2 dev (or --data, such as a build's
holdout.tsv) from the running tiers' exit probabilities by the tier rule.

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
from shared.contract.manifest import CostModel
from shared.contract.policy import (
    DEFAULT_DELTA,
    candidate_thresholds,
    choose_policy,
    cost_aware_thresholds,
    relative_cost,
    route,
    routed_figures,
)

P_TAR_SWEEP = np.round(np.arange(0.80, 0.995, 0.005), 3)
FOUR_PATHS = (1.0, 0.75, 0.5, 0.25)  # the cost policy's paths before one fixed path (shared.contract.policy)


def evaluate(probs: list[np.ndarray], labels: np.ndarray, thresholds: list[float],
             split_points: tuple[int, int, int], cost: Any) -> dict[str, float]:
    f = routed_figures(probs, labels, thresholds, split_points, cost)
    return {"accuracy": f["system_accuracy"], "accuracy_drop_points": f["accuracy_drop_points"],
            "relative_cost": f["relative_cost"], "exit_fractions": f["exit_fraction"]}


def uncorrected_cost_thresholds(probs: list[np.ndarray], labels: np.ndarray, split_points: tuple[int, int, int],
                                cost: CostModel, max_drop: float, grid: int = 60) -> list[float]:
    """The cheapest (mobile, edge) pair of a quantile grid whose measured drop is within budget:
    the cost policy before issue 22, without its margin."""
    correct = [p.argmax(-1) == labels for p in probs]
    final = float(np.mean(correct[-1]))
    best, best_cost = [2.0, 2.0], relative_cost(np.array([0.0, 0.0, 1.0]), split_points, cost)
    for tau_m in candidate_thresholds(probs[0].max(-1), grid):
        for tau_e in candidate_thresholds(probs[1].max(-1), grid):
            r = route(probs, [float(tau_m), float(tau_e)])
            if final - np.mean(np.choose(r.exit_index, correct)) > max_drop / 100 + 1e-12:
                continue
            c = relative_cost(r.fractions(), split_points, cost)
            if c < best_cost - 1e-12:
                best, best_cost = [float(tau_m), float(tau_e)], c
    return best


def stop(probs: list[np.ndarray], labels: np.ndarray, split_points: tuple[int, int, int], cost: CostModel,
         max_drop: float, delta: float) -> list[dict[str, Any]]:
    """Where the guaranteed search stopped on its path (shared.contract.policy.cost_aware_thresholds'
    own walk): the last candidate it certified and the first it refused, each with the answers lost
    and gained against the final exit on the calibration split and the drop's bound (points)."""
    choice = cost_aware_thresholds(probs, labels, split_points, cost, max_drop, delta)
    return [{"thresholds": s.thresholds, "relative_cost": s.relative_cost, "lost": s.lost, "gained": s.gained,
             "bound_points": 100 * s.drop_bound, "certified": s.certified} for s in choice.stops]


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        max_drop: float = 0.3, delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    manifest = load(artifacts)
    points, cost = manifest.split_points(), manifest.cost_model
    calib, calib_labels = calibration_probs(artifacts, manifest)
    texts, labels = dev_set(manifest, data, limit, artifacts, pairs=True)
    with tiers(artifacts) as cluster:
        dev = exit_probabilities(cluster.entry_address, texts)

    cost_taus, cost_spec = choose_policy("cost", calib, calib_labels, points, cost, max_drop_points=max_drop,
                                         delta=delta)
    loose_taus = uncorrected_cost_thresholds(calib, calib_labels, points, cost, max_drop)
    loose = evaluate(calib, calib_labels, loose_taus, points, cost)
    paths = cost_aware_thresholds(calib, calib_labels, points, cost, max_drop, delta, exponents=FOUR_PATHS)
    ceiling_taus = uncorrected_cost_thresholds(dev, labels, points, cost, max_drop)
    rows = []
    for p_tar in P_TAR_SWEEP:
        taus, spec = choose_policy("p_tar", calib, calib_labels, points, cost, p_tar=(p_tar, p_tar))
        rows.append((float(p_tar), taus, spec))
    as_accurate = [r for r in rows if r[2].expected_accuracy >= cost_spec.expected_accuracy - 1e-12]
    p_tar, p_taus, p_spec = min(as_accurate, key=lambda r: r[2].expected_cost) if as_accurate else rows[-1]

    result: dict[str, Any] = {"machine": machine(), "artifacts": str(artifacts), "samples": len(labels),
                              "cost_model": cost.model_dump(), "max_drop_points": max_drop, "delta": delta,
                              "drop_bound_points": cost_spec.drop_bound_points}
    for name, taus, spec in (("cost_aware", cost_taus, cost_spec), ("p_tar", p_taus, p_spec)):
        result[name] = {"thresholds": taus, "calibration": {"accuracy": spec.expected_accuracy,
                                                           "relative_cost": spec.expected_cost},
                        "dev": evaluate(dev, labels, taus, points, cost)}
    result["p_tar"]["p_tar"] = p_tar
    result["cost_uncorrected"] = {
        "thresholds": loose_taus,
        "calibration": {"accuracy": loose["accuracy"], "relative_cost": loose["relative_cost"]},
        "dev": evaluate(dev, labels, loose_taus, points, cost)}
    result["cost_four_paths"] = {
        "thresholds": paths.thresholds,
        "calibration": {"accuracy": paths.accuracy, "relative_cost": paths.relative_cost},
        "dev": evaluate(dev, labels, paths.thresholds, points, cost)}
    on_dev = evaluate(calib, calib_labels, ceiling_taus, points, cost)
    result["cost_chosen_on_dev"] = {
        "thresholds": ceiling_taus,
        "calibration": {"accuracy": on_dev["accuracy"], "relative_cost": on_dev["relative_cost"]},
        "dev": evaluate(dev, labels, ceiling_taus, points, cost)}
    result["cost_aware_stop"] = stop(calib, calib_labels, points, cost, max_drop, delta)
    result["cost_aware_no_more_expensive"] = bool(
        result["cost_aware"]["calibration"]["relative_cost"] <= result["p_tar"]["calibration"]["relative_cost"])

    names = {"cost_aware": f"cost, guaranteed (delta {delta})", "cost_four_paths": "cost, 4 paths",
             "cost_uncorrected": "cost, uncorrected", "cost_chosen_on_dev": "cost, chosen on eval split",
             "p_tar": f"p_tar {p_tar}"}
    # "dev": the evaluation split, SST-2 dev or the model's test split unless --data names another
    print(table(["policy", "mobile tau", "edge tau", "calib acc", "calib cost", "eval acc", "eval drop pts",
                 "eval cost"],
                [[label, *[round(t, 4) for t in result[name]["thresholds"]],
                  result[name]["calibration"]["accuracy"], result[name]["calibration"]["relative_cost"],
                  result[name]["dev"]["accuracy"], result[name]["dev"]["accuracy_drop_points"],
                  result[name]["dev"]["relative_cost"]] for name, label in names.items()]))
    saved = {name: f"{100 * (1 - result[name]['dev']['relative_cost']):.1f}%" for name in names}
    print(f"cost policy at <= {max_drop} points: drop bound on the calibration split {cost_spec.drop_bound_points:.2f} "
          f"points; evaluation-split cost reduction vs cloud-only {saved['cost_aware']} (4 paths "
          f"{saved['cost_four_paths']}, uncorrected {saved['cost_uncorrected']}, the model's ceiling chosen on that "
          f"split {saved['cost_chosen_on_dev']})")
    print(f"the guaranteed search's stop on its path, on the {len(calib_labels)} calibration samples:")
    print(table(["candidate", "mobile tau", "edge tau", "calib cost", "lost", "gained", "drop bound pts"],
                [["certified" if c["certified"] else "refused", *[round(t, 4) for t in c["thresholds"]],
                  c["relative_cost"], c["lost"], c["gained"], c["bound_points"]] for c in result["cost_aware_stop"]]))
    if out is not None:
        print(f"wrote {write_result(out, 'policy', result)}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.3, help="cost policy: accuracy drop allowed, points")
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="cost policy: the guarantee's delta")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.max_drop, args.delta)


if __name__ == "__main__":
    main()
