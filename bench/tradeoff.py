"""Accuracy versus expected cost (DESIGN.md's cost model) on SST-2 dev, from the running tiers.

The tiers answer the dev set three times (every sample answered at mobile, at edge, at cloud: the
calibrated probabilities of every exit); any threshold pair's answers follow from those by the tier
rule (shared.contract.policy.route, the rule shared.serving.tier applies online). The sweep covers a grid of
threshold pairs for hop costs o in 0.1..0.6 and draws the frontier against cloud-only,
mobile-only, edge-only and the uncalibrated model (temperatures 1, its thresholds chosen its own
way). The headline: thresholds from shared.contract.policy.cost_aware_thresholds on the calibration split
(never dev) for an accuracy drop <= 0.3 points at o = 0.3, guaranteed with probability >= 1 - delta
(shared.contract.policy.DEFAULT_DELTA), then the dev set through the running tiers with those thresholds,
cost and accuracy counted from the answers' exit tiers. "best on dev" picks thresholds on dev
itself with no margin: an upper bound on what any choice could reach, not a result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    base_parser,
    calibration_probs,
    classify_all,
    dev_set,
    exit_index,
    exit_probabilities,
    load,
    predictions,
    table,
    tiers,
    uncalibrated_artifact,
    write_result,
)
from shared.contract.manifest import NEVER_EXIT, TIERS, CostModel, Manifest
from shared.contract.policy import DEFAULT_DELTA, candidate_thresholds, cost_aware_thresholds, relative_cost, route

HOP_COSTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
HEADLINE_O = 0.3
MAX_DROP_POINTS = 0.3


def cost_model(manifest: Manifest, o: float) -> CostModel:
    return CostModel(layer_cost=manifest.cost_model.layer_cost,
                     hop_cost={"mobile_edge": o, "edge_cloud": o, "mobile_cloud": o})


def grid_points(probs: list[np.ndarray], labels: np.ndarray, grid: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Exit fractions [K, 3] and accuracy [K] for a grid of (mobile, edge) threshold pairs."""
    fractions, accuracy = [], []
    for tau_m in candidate_thresholds(probs[0].max(-1), grid):
        for tau_e in candidate_thresholds(probs[1].max(-1), grid):
            r = route(probs, [float(tau_m), float(tau_e)])
            fractions.append(r.fractions())
            accuracy.append(np.mean(r.prediction == labels))
    return np.array(fractions), np.array(accuracy)


def frontier(cost: np.ndarray, accuracy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto front: least cost for each accuracy reached (ascending cost, rising accuracy)."""
    order = np.lexsort((-accuracy, cost))
    best, keep = -1.0, []
    for i in order:
        if accuracy[i] > best:
            keep.append(i)
            best = accuracy[i]
    return cost[keep], accuracy[keep]


def evaluate(answers: list[Any], labels: np.ndarray, split_points: tuple[int, int, int], cost: CostModel
             ) -> dict[str, Any]:
    exits = exit_index(answers)
    fractions = np.bincount(exits, minlength=3) / len(exits)
    return {"accuracy": float(np.mean(predictions(answers) == labels)),
            "relative_cost": relative_cost(fractions, split_points, cost),
            "exit_fractions": dict(zip(TIERS, fractions.tolist(), strict=True))}


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        grid: int = 40) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, labels = dev_set(manifest, data, limit, artifacts)
    points = manifest.split_points()
    headline_cost = cost_model(manifest, HEADLINE_O)
    calib = {kind: calibration_probs(artifacts, manifest, kind == "calibrated")
             for kind in ("calibrated", "uncalibrated")}
    chosen = {kind: cost_aware_thresholds(p, y, points, headline_cost, MAX_DROP_POINTS).thresholds
              for kind, (p, y) in calib.items()}
    live: dict[str, Any] = {}
    with tiers(artifacts) as cluster:
        probs = exit_probabilities(cluster.entry_address, texts)
        answers = classify_all(cluster.entry_address, texts, dict(zip(TIERS, chosen["calibrated"], strict=False)))
        live["calibrated"] = evaluate(answers, labels, points, headline_cost)
        offline = route(probs, chosen["calibrated"])
        live["calibrated"]["route_agrees"] = bool(np.array_equal(offline.exit_index, exit_index(answers)))
        defaults = classify_all(cluster.entry_address, texts)
        live["manifest_thresholds"] = evaluate(defaults, labels, points, headline_cost)
    with tiers(uncalibrated_artifact(artifacts, artifacts.with_name(artifacts.name + "-uncalibrated"))) as cluster:
        answers = classify_all(cluster.entry_address, texts, dict(zip(TIERS, chosen["uncalibrated"], strict=False)))
        live["uncalibrated"] = evaluate(answers, labels, points, headline_cost)

    accuracy_by_exit = [float(np.mean(p.argmax(-1) == labels)) for p in probs]
    cloud_accuracy = accuracy_by_exit[-1]
    fractions, grid_accuracy = grid_points(probs, labels, grid)
    sweep = []
    for o in HOP_COSTS:
        cost = cost_model(manifest, o)
        grid_cost = np.array([relative_cost(f, points, cost) for f in fractions])
        cal = cost_aware_thresholds(*calib["calibrated"], points, cost, MAX_DROP_POINTS).thresholds
        # on dev itself, any threshold pair of the grid, no margin: what no choice could beat
        within = grid_accuracy >= cloud_accuracy - MAX_DROP_POINTS / 100 - 1e-12
        oracle = float(grid_cost[within].min()) if within.any() else 1.0
        r = route(probs, cal)
        front_cost, front_accuracy = frontier(grid_cost, grid_accuracy)
        sweep.append({
            "o": o, "cloud_only": {"relative_cost": 1.0, "accuracy": cloud_accuracy},
            "mobile_only": {"relative_cost": relative_cost(np.array([1, 0, 0]), points, cost),
                            "accuracy": accuracy_by_exit[0]},
            "edge_only": {"relative_cost": relative_cost(np.array([0, 1, 0]), points, cost),
                          "accuracy": accuracy_by_exit[1]},
            "calibration_split_thresholds": cal,
            "chosen_on_calibration": {"relative_cost": relative_cost(r.fractions(), points, cost),
                                      "accuracy": float(np.mean(r.prediction == labels))},
            "best_on_dev_within_drop": oracle,  # an upper bound, not a claim
            "frontier": {"relative_cost": front_cost.tolist(), "accuracy": front_accuracy.tolist()},
            "grid": {"relative_cost": grid_cost.tolist(), "accuracy": grid_accuracy.tolist()},
        })
    headline = live["calibrated"]
    result = {
        "samples": len(texts), "split_points": points, "accuracy_by_exit": dict(zip(TIERS, accuracy_by_exit,
                                                                                      strict=True)),
        "cloud_only_accuracy": cloud_accuracy, "headline_o": HEADLINE_O, "max_drop_points": MAX_DROP_POINTS,
        "delta": DEFAULT_DELTA,
        "thresholds": {k: [t if t < NEVER_EXIT else None for t in v] for k, v in chosen.items()},
        "live": live,
        "cost_reduction": 1 - headline["relative_cost"],
        "accuracy_drop_points": (cloud_accuracy - headline["accuracy"]) * 100,
        "uncalibrated_cost_reduction": 1 - live["uncalibrated"]["relative_cost"],
        "uncalibrated_accuracy_drop_points": (cloud_accuracy - live["uncalibrated"]["accuracy"]) * 100,
        "sweep": sweep,
    }
    _print(result)
    if out is not None:
        write_result(out, "tradeoff", result)
        plot(result, out / "tradeoff.png")
    return result


def _print(result: dict[str, Any]) -> None:
    cloud = result["cloud_only_accuracy"]
    rows = []
    for s in result["sweep"]:
        c = s["chosen_on_calibration"]
        rows.append([s["o"], 1 - c["relative_cost"], (cloud - c["accuracy"]) * 100,
                     1 - s["best_on_dev_within_drop"],
                     1 - s["mobile_only"]["relative_cost"], (cloud - s["mobile_only"]["accuracy"]) * 100,
                     1 - s["edge_only"]["relative_cost"], (cloud - s["edge_only"]["accuracy"]) * 100])
    print(table(["o", "cost cut (calib thr)", "drop pts", "oracle cut (chosen on dev)",
                 "mobile-only cut", "drop pts", "edge-only cut", "drop pts"], rows))
    live = result["live"]
    print(table(["live on dev, o = 0.3", "relative cost", "cost cut", "accuracy", "drop pts", "exits m/e/c"], [
        [name, v["relative_cost"], 1 - v["relative_cost"], v["accuracy"], (cloud - v["accuracy"]) * 100,
         "/".join(f"{x:.2f}" for x in v["exit_fractions"].values())] for name, v in live.items()]))
    print(f"headline (o = 0.3, thresholds {result['thresholds']['calibrated']} from the calibration split): "
          f"cost reduction {result['cost_reduction'] * 100:.1f}%, accuracy drop "
          f"{result['accuracy_drop_points']:.2f} points vs cloud-only {cloud:.4f}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    cloud = result["cloud_only_accuracy"]
    for s in result["sweep"]:
        f = s["frontier"]
        left.plot(f["relative_cost"], np.array(f["accuracy"]) * 100, drawstyle="steps-post",
                  label=f"frontier o={s['o']}", alpha=0.9 if s["o"] == result["headline_o"] else 0.35)
    head = next(s for s in result["sweep"] if s["o"] == result["headline_o"])
    left.scatter(head["grid"]["relative_cost"], np.array(head["grid"]["accuracy"]) * 100, s=3, c="0.75",
                 label="threshold grid (o=0.3)", zorder=0)
    marks = {"cloud-only": head["cloud_only"], "mobile-only": head["mobile_only"], "edge-only": head["edge_only"]}
    for (name, p), marker in zip(marks.items(), "so^", strict=True):
        left.scatter(p["relative_cost"], p["accuracy"] * 100, marker=marker, s=60, label=name, zorder=3)
    for name, marker in (("calibrated", "*"), ("uncalibrated", "X")):
        p = result["live"][name]
        left.scatter(p["relative_cost"], p["accuracy"] * 100, marker=marker, s=160, zorder=4,
                     label=f"{name}, thresholds from calibration split (live)")
    left.axhline((cloud - result["max_drop_points"] / 100) * 100, ls=":", c="k", lw=0.8, label="0.3-point drop")
    left.set(xlabel="expected cost relative to cloud-only", ylabel="dev accuracy (%)",
             title="SST-2 dev: accuracy vs cost")
    left.legend(fontsize=7, loc="lower right")
    o = [s["o"] for s in result["sweep"]]
    drops = [(cloud - s["chosen_on_calibration"]["accuracy"]) * 100 for s in result["sweep"]]
    right.plot(o, [100 * (1 - s["chosen_on_calibration"]["relative_cost"]) for s in result["sweep"]], "o-",
               label=f"thresholds from calibration split (dev drop {min(drops):.2f}..{max(drops):.2f} pts)")
    right.plot(o, [100 * (1 - s["best_on_dev_within_drop"]) for s in result["sweep"]], "s--",
               label="thresholds chosen on dev itself (oracle bound)")
    right.axhline(43, ls=":", c="k", lw=0.8, label="43% (DIMEE on GLUE)")
    right.set(xlabel="hop cost o", ylabel="cost reduction vs cloud-only (%)", title="cost reduction by hop cost")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=40, help="threshold candidates per exit in the sweep")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.grid)


if __name__ == "__main__":
    main()
