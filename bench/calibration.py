"""Do the exits keep their promise on data the thresholds were not chosen on? For p_tar 0.8..0.95,
the accuracy reached on SST-2 dev by the samples that exit at mobile and at edge, and their share.

The tiers answer the dev set once per exit (bench.common.exit_probabilities: the calibrated
probabilities of every exit for every sample); each rule's answers then follow by the tier rule
(shared.contract.policy.route, which the tiers apply online: bench.tradeoff checks they agree).
Three threshold rules, each from the build's calibration split only, never from dev:
- "guaranteed": shared.contract.policy.p_tar_thresholds, the project's p_tar policy: each tier's
  answers reach p_tar with probability >= 1 - delta over the calibration draw (exact
  Clopper-Pearson tests in fixed sequence);
- "uncorrected": the lowest threshold whose calibration answers reach p_tar (Pacheco et al. 2020;
  the policy before issue 22), per tier in order: what the guarantee costs in exit share is the
  difference between the two;
- "threshold = p_tar": exit when the confidence itself is >= p_tar, which trusts the confidence as a
  probability: the rule that calibration exists for, shown calibrated and uncalibrated (T = 1);
- "guaranteed consistency": the p_tar policy with --target consistency: the exiting answers agree
  with the final exit's answer at least p_tar of the time (no labels used); its miss is measured on
  that agreement, every other rule's on accuracy. Every row gives both.
For two classes temperature scaling keeps the order of confidences, so the two rules searched on
the calibration split pick the same samples calibrated or not: they are shown calibrated only.

The temperatures' keep rule: over SPLIT_SEEDS seeds, how often 5-fold cross-validation
(shared.contract.calibration.calibrate_exit) and the single 70/30 split it replaced keep each exit's
fitted temperature, from the build's calibration logits; and each exit's ECE on the evaluation
split before and after, with 90% bootstrap intervals.
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
    uncalibrated,
    write_result,
)
from shared.contract.calibration import (
    calibrate_exit,
    ece_interval,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from shared.contract.manifest import NEVER_EXIT, TIERS, load_calibration_logits
from shared.contract.policy import DEFAULT_DELTA, p_tar_thresholds, route, threshold_for_target

P_TARS = (0.8, 0.85, 0.9, 0.95)
EXITS = TIERS[:2]
RULES = ("guaranteed", "uncorrected", "threshold = p_tar", "guaranteed consistency")
SPLIT_SEEDS = 20


def half_split_keeps(logits: np.ndarray, labels: np.ndarray, seed: int, check_fraction: float = 0.3) -> bool:
    """The keep rule before issue 22: fit T on 70% of the split, keep it if the other 30%'s NLL falls."""
    order = np.random.default_rng(seed).permutation(len(labels))
    check, fit = order[: int(len(labels) * check_fraction)], order[int(len(labels) * check_fraction):]
    t = fit_temperature(logits[fit], labels[fit])
    return nll(logits[check], labels[check], t) < nll(logits[check], labels[check], 1.0)


def temperature_rows(artifacts: Path, dev: list[np.ndarray], dev_raw: list[np.ndarray], labels: np.ndarray,
                     temperatures: list[float]) -> list[dict[str, Any]]:
    logits, calib_labels = load_calibration_logits(artifacts)
    rows = []
    for i, tier in enumerate(TIERS):
        z = logits[i]
        rows.append({
            "tier": tier, "temperature": temperatures[i], "fitted": fit_temperature(z, calib_labels),
            "kept_cross_validated": sum(calibrate_exit(z, calib_labels, seed=s).kept for s in range(SPLIT_SEEDS)),
            "kept_half_split": sum(half_split_keeps(z, calib_labels, s) for s in range(SPLIT_SEEDS)),
            "seeds": SPLIT_SEEDS,
            "ece_before": expected_calibration_error(dev_raw[i], labels),
            "ece_before_interval": ece_interval(dev_raw[i], labels),
            "ece_after": expected_calibration_error(dev[i], labels),
            "ece_after_interval": ece_interval(dev[i], labels),
        })
    return rows


def uncorrected_thresholds(probs: list[np.ndarray], labels: np.ndarray, p_tar: float) -> list[float]:
    """threshold_for_target per tier over the samples reaching it: the rule without the guarantee."""
    thresholds: list[float] = []
    reaching = np.ones(len(labels), dtype=bool)
    for p in probs[:-1]:
        conf, correct = p.max(-1), p.argmax(-1) == labels
        tau = threshold_for_target(conf[reaching], correct[reaching], p_tar)
        thresholds.append(tau)
        reaching &= conf < tau
    return thresholds


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        p_tars: tuple[float, ...] = P_TARS, delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, labels = dev_set(manifest, data, limit, artifacts, pairs=True)
    calib, calib_labels = calibration_probs(artifacts, manifest)
    with tiers(artifacts) as cluster:
        dev = exit_probabilities(cluster.entry_address, texts)
    dev_by_kind = {"calibrated": dev, "uncalibrated": uncalibrated(dev, manifest)}
    rows: list[dict[str, Any]] = []
    for p_tar in p_tars:
        guaranteed = p_tar_thresholds(calib, calib_labels, [p_tar, p_tar], delta)
        agreeing = p_tar_thresholds(calib, None, [p_tar, p_tar], delta, target="consistency")
        choices = {
            ("calibrated", "guaranteed"): ([g.threshold for g in guaranteed], [g.bound for g in guaranteed]),
            ("calibrated", "uncorrected"): (uncorrected_thresholds(calib, calib_labels, p_tar), [None, None]),
            ("calibrated", "threshold = p_tar"): ([p_tar, p_tar], [None, None]),
            ("uncalibrated", "threshold = p_tar"): ([p_tar, p_tar], [None, None]),
            ("calibrated", "guaranteed consistency"): ([g.threshold for g in agreeing], [g.bound for g in agreeing]),
        }
        for (kind, rule), (thresholds, bounds) in choices.items():
            probs = dev_by_kind[kind]
            r = route(probs, thresholds)
            correct, agree = r.prediction == labels, r.prediction == probs[-1].argmax(-1)
            for i, tier in enumerate(EXITS):
                here = r.exit_index == i
                accuracy = float(correct[here].mean()) if here.any() else None
                agreement = float(agree[here].mean()) if here.any() else None
                measured = agreement if rule == "guaranteed consistency" else accuracy
                rows.append({"kind": kind, "rule": rule, "p_tar": p_tar, "tier": tier,
                             "threshold": thresholds[i] if thresholds[i] < NEVER_EXIT else None,
                             "bound": bounds[i], "exited": int(here.sum()), "share": float(here.mean()),
                             "accuracy": accuracy, "agreement": agreement,
                             "miss": None if measured is None else p_tar - measured})
    result: dict[str, Any] = {"machine": machine(), "artifacts": str(artifacts), "samples": len(texts),
                              "delta": delta, "rows": rows,
                              "temperatures": temperature_rows(artifacts, dev, dev_by_kind["uncalibrated"], labels,
                                                               [e.temperature for e in manifest.exits])}
    for kind, rule in {(r["kind"], r["rule"]) for r in rows}:
        misses = [r["miss"] for r in rows if r["kind"] == kind and r["rule"] == rule and r["miss"] is not None]
        result[f"max_miss/{kind}/{rule}"] = max(misses) if misses else None
    # the headline names the project's rule
    result["calibration_max_miss"] = result["max_miss/calibrated/guaranteed"]
    result["coverage"] = {
        str(p): {rule: sum(r["share"] for r in rows if r["p_tar"] == p and r["rule"] == rule
                           and r["kind"] == "calibrated") for rule in RULES[:2]} for p in p_tars}
    print(table(["model", "rule", "p_tar", "exit", "threshold", "bound", "exited", "share", "accuracy",
                 "agrees w/ final", "p_tar - measured"],
                [[r["kind"], r["rule"], r["p_tar"], r["tier"], r["threshold"], r["bound"], r["exited"], r["share"],
                  r["accuracy"], r["agreement"], r["miss"]] for r in rows]))
    print(f"largest p_tar - accuracy over the exits (negative: every exit beat its target), delta {delta}: "
          + "; ".join(f"{rule} ({kind}) {_fmt(result[f'max_miss/{kind}/{rule}'])}"
                      for kind, rule in [("calibrated", r) for r in RULES] + [("uncalibrated", RULES[2])]))
    print("early-exit share on dev, guaranteed vs uncorrected: " + "; ".join(
        f"p_tar {p}: {c['guaranteed']:.3f} vs {c['uncorrected']:.3f}" for p, c in result["coverage"].items()))
    print(table(["exit", "T shipped", "T fitted", f"kept, 5-fold CV (of {SPLIT_SEEDS} seeds)", "kept, 70/30 split",
                 "ECE before", "90% interval", "ECE after", "90% interval"],
                [[t["tier"], t["temperature"], t["fitted"], t["kept_cross_validated"], t["kept_half_split"],
                  t["ece_before"], "{:.4f}-{:.4f}".format(*t["ece_before_interval"]), t["ece_after"],
                  "{:.4f}-{:.4f}".format(*t["ece_after_interval"])] for t in result["temperatures"]]))
    if out is not None:
        print(f"wrote {write_result(out, 'calibration', result)}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="the guarantee's delta")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, delta=args.delta)


if __name__ == "__main__":
    main()
