"""Do calibrated exits keep their promise? For p_tar in 0.8..0.95, the accuracy actually reached on
SST-2 dev by the samples that exit at mobile and at edge, calibrated versus uncalibrated.

Two threshold rules, each applied to the calibrated build and to a temperature-1 copy of it
(bench.common.uncalibrated_artifact), the dev set running through the tiers with the thresholds
per request:
- "calibration split": shared.contract.policy.p_tar_thresholds on the build's held-out calibration logits
  (the project's p_tar policy). It ranks samples by confidence and measures accuracy, so for two
  classes (where temperature scaling keeps the order of confidences) it picks the same samples
  with or without calibration;
- "threshold = p_tar": exit when the confidence itself is >= p_tar (Pacheco et al. 2020), which
  trusts the confidence as a probability: the rule that calibration exists for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import (
    base_parser,
    calibration_probs,
    classify_all,
    dev_set,
    exit_index,
    load,
    predictions,
    table,
    tiers,
    uncalibrated_artifact,
    write_result,
)
from shared.contract.manifest import NEVER_EXIT, TIERS
from shared.contract.policy import p_tar_thresholds

P_TARS = (0.8, 0.85, 0.9, 0.95)
EXITS = TIERS[:2]
RULES = ("calibration split", "threshold = p_tar")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        p_tars: tuple[float, ...] = P_TARS) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, labels = dev_set(manifest, data, limit)
    folders = {"calibrated": artifacts,
               "uncalibrated": uncalibrated_artifact(artifacts, artifacts.with_name(artifacts.name + "-uncalibrated"))}
    rows: list[dict[str, Any]] = []
    for kind, folder in folders.items():
        probs, calib_labels = calibration_probs(artifacts, manifest, kind == "calibrated")
        with tiers(folder) as cluster:
            for rule in RULES:
                for p_tar in p_tars:
                    thresholds = (p_tar_thresholds(probs, calib_labels, [p_tar, p_tar]) if rule == RULES[0]
                                  else [p_tar, p_tar])
                    answers = classify_all(cluster.entry_address, texts, dict(zip(EXITS, thresholds, strict=True)))
                    exits, correct = exit_index(answers), predictions(answers) == labels
                    for i, tier in enumerate(EXITS):
                        here = exits == i
                        accuracy = float(correct[here].mean()) if here.any() else None
                        rows.append({"kind": kind, "rule": rule, "p_tar": p_tar, "tier": tier,
                                     "threshold": thresholds[i] if thresholds[i] < NEVER_EXIT else None,
                                     "exited": int(here.sum()), "share": float(here.mean()), "accuracy": accuracy,
                                     "miss": None if accuracy is None else p_tar - accuracy})
    result: dict[str, Any] = {"samples": len(texts), "rows": rows}
    for kind in folders:
        for rule, suffix in zip(RULES, ("", "_direct"), strict=True):
            misses = [r["miss"] for r in rows if r["kind"] == kind and r["rule"] == rule and r["miss"] is not None]
            prefix = "calibration" if kind == "calibrated" else "uncalibrated"
            result[f"{prefix}_max_miss{suffix}"] = max(misses) if misses else None
    print(table(["model", "rule", "p_tar", "exit", "threshold", "exited", "share", "accuracy", "p_tar - acc"],
                [[r["kind"], r["rule"], r["p_tar"], r["tier"], r["threshold"], r["exited"], r["share"],
                  r["accuracy"], r["miss"]] for r in rows]))
    print(f"largest p_tar - accuracy over the exits (negative: every exit beat its target): thresholds from "
          f"the calibration split: calibrated {_fmt(result['calibration_max_miss'])}, uncalibrated "
          f"{_fmt(result['uncalibrated_max_miss'])}; threshold = p_tar: calibrated "
          f"{_fmt(result['calibration_max_miss_direct'])}, uncalibrated {_fmt(result['uncalibrated_max_miss_direct'])}")
    if out is not None:
        write_result(out, "calibration", result)
    return result


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out)


if __name__ == "__main__":
    main()
