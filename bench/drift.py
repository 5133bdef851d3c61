"""Drift: a stream of SST-2 dev sentences that shifts part-way, served with static and with adaptive
thresholds (shared.serving.controller) at the same agreement target, both with the same audits.
The shift (--shift): `domain`, sentences of another domain (news, GLUE MRPC's first sentences)
mixed in at a rising rate until they are all the stream; or `typos`, progressively corrupted text
(swapped, dropped, doubled letters; dropped words).

Both runs start from the same thresholds, the build's guaranteed search for the target's agreement
with the final exit on the model's calibration split (policy.p_tar_thresholds, "consistency"): the
thresholds a build for this target would ship; the static run keeps them, the adaptive one lets its
controller (CONTROLLER: a window of 800 audits, an update every 50 once 200 have come, steps of 0.02
at most) move them.

Per window of WINDOW samples: the agreement of the early answers (mobile and edge) with the final
exit (the final exit's label of every sample comes from a pass forced to the cloud), the share of
early answers, the cost relative to cloud-only, and the mobile and edge thresholds in force.
Audit cost, measured at the tiers that do the audits' work: the samples each later tier ran
(tierserve_batch_size_sum) less the traffic it was sent (tierserve_samples_total) are the audits it
ran, over the samples that reached the auditing exit (the configured fraction).
Goal: after the shift, adaptive thresholds bring agreement back to within 1 point of the target
within 2,000 samples and keep it there; static thresholds fall below it. Writes drift.json and
drift.png.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FORCE_CLOUD,
    base_parser,
    calibration_probs,
    classify_all,
    dev_set,
    load,
    machine,
    scrape,
    table,
    tiers,
    write_result,
)
from shared.client import TierClient
from shared.contract.manifest import TIERS
from shared.contract.policy import p_tar_thresholds, relative_cost

WINDOW = 500
BATCH = 8
SAMPLES = 8000
SHIFT_AT = 3000
RAMP = 1000  # samples over which the corruption rises to its full rate
MAX_RATE = 0.35  # per word: chance of a typo, and (half of it) of being dropped
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
DELTA = 0.1  # the audits' and the static thresholds' delta
# The adaptive run's controller. A window of 400 audits forgets the pre-shift traffic sooner, but
# at target 0.975 its guaranteed search often certifies no mobile threshold at all and pins the
# mobile exit at the ceiling (measured: cost 0.83-0.96 of cloud-only against static's 0.64-0.68);
# 800 keeps the mobile exit answering.
CONTROLLER = {"controller_every": 50, "controller_min_samples": 200, "controller_window": 800,
              "controller_max_step": 0.02, "controller_floor": 0.5, "controller_ceiling": 1.0}


def corrupt(text: str, rate: float, rng: random.Random) -> str:
    """Typos (a swapped, dropped or doubled letter) and dropped words, each word with chance `rate`."""
    words = []
    for word in text.split():
        if rng.random() < rate / 2 and len(words) > 1:
            continue
        if rng.random() < rate and len(word) > 2:
            i = rng.randrange(len(word) - 1)
            kind = rng.choice(("swap", "drop", "double"))
            if kind == "swap":
                word = word[:i] + word[i + 1] + word[i] + word[i + 2:]
            elif kind == "drop":
                word = word[:i] + word[i + 1:]
            else:
                word = word[:i] + word[i] + word[i:]
        words.append(word)
    return " ".join(words) or text


def drift_stream(texts: list[str], samples: int = SAMPLES, shift_at: int = SHIFT_AT, seed: int = 0,
                 other: list[str] | None = None) -> list[str]:
    """`texts` cycled; from `shift_at` on, over RAMP samples, more and more of `other` (a domain
    shift) or, without it, more and more corrupted."""
    rng = random.Random(seed)
    stream = []
    for i in range(samples):
        text = texts[i % len(texts)]
        ramp = min(1.0, max(0, i - shift_at) / RAMP) if i >= shift_at else 0.0
        if other is not None:
            stream.append(other[i % len(other)] if rng.random() < ramp else text)
        else:
            stream.append(corrupt(text, MAX_RATE * ramp, rng) if ramp else text)
    return stream


def other_domain(data_root: Path) -> list[str]:
    """GLUE MRPC's first sentences (news), as GLUE distributes them (a byte-order mark included)."""
    import csv

    with open(data_root / "mrpc" / "train.tsv", encoding="utf-8-sig", newline="") as f:
        return [row["#1 String"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _serve(artifacts: Path, stream: list[str], final: np.ndarray, flags: dict[str, dict[str, object]],
           manifest: Any) -> dict[str, Any]:
    windows = []
    with tiers(artifacts, flags) as cluster, TierClient(cluster.entry_address, timeout=60) as client:
        for start in range(0, len(stream), WINDOW):
            answers = [a for i in range(start, min(start + WINDOW, len(stream)), BATCH)
                       for a in client.classify(stream[i:min(i + BATCH, start + WINDOW)])]
            exits = np.array([TIERS.index(a.tier) for a in answers])
            labels = np.array([a.label_index for a in answers])
            early = exits < len(TIERS) - 1
            agree = labels[early] == final[start:start + len(answers)][early]
            thresholds = {tier: scrape(cluster.tiers[tier].metrics_port)[
                ("tierserve_exit_threshold", (("tier", tier),))] for tier in TIERS[:-1]}
            fractions = np.bincount(exits, minlength=len(TIERS)) / len(exits)
            windows.append({"start": start, "agreement": float(agree.mean()) if early.any() else None,
                            "early_share": float(early.mean()),
                            "cost": relative_cost(fractions, manifest.split_points(), manifest.cost_model),
                            "thresholds": thresholds})
        scraped = {tier: scrape(cluster.tiers[tier].metrics_port) for tier in TIERS}
    audit = {}
    audits_before = 0.0  # audits the later tiers ran for the exits before this one
    for tier, later in zip(TIERS[:-1], TIERS[1:], strict=True):
        own, next_ = scraped[tier], scraped[later]
        label = (("tier", tier),)
        # every sample a tier ran less the traffic it was sent: the audits it ran (an audit runs
        # every tier after the exit that sent it, as the final exit only answers it)
        ran = next_[("tierserve_batch_size_sum", (("tier", later),))] - next_[
            ("tierserve_samples_total", (("tier", later),))]
        audited = ran - audits_before
        audits_before = ran
        received = own[("tierserve_samples_total", label)]
        audit[tier] = {"audited_samples": audited, "samples": received,
                       "audit_share": audited / received if received else None,
                       "next_tier_samples_run": next_[("tierserve_batch_size_sum", (("tier", later),))],
                       "audited_answers": own[("tierserve_audits_total", label)],
                       "dropped": own[("tierserve_audits_dropped_total", label)]}
    return {"windows": windows, "audits": audit}


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        target: float = 0.95, fraction: float = 0.2, samples: int = SAMPLES, shift: str = "domain",
        data_root: Path = DATA_ROOT) -> dict[str, Any]:
    manifest = load(artifacts)
    texts, _ = dev_set(manifest, data, limit)
    stream = drift_stream(texts, samples, min(SHIFT_AT, samples // 2),
                          other=other_domain(data_root) if shift == "domain" else None)
    starts = static_thresholds(artifacts, manifest, target)
    with tiers(artifacts) as cluster:
        final = np.array([a.label_index for a in classify_all(cluster.entry_address, stream, FORCE_CLOUD)])
    audits = {"audit_fraction": fraction, "audit_budget_samples": 64, "agreement_target": target,
              "audit_delta": DELTA}
    adaptive = {**audits, "threshold_controller": "true", **CONTROLLER}
    runs = {name: _serve(artifacts, stream, final, {tier: {**flags, "threshold": starts[tier]} for tier in starts},
                         manifest)
            for name, flags in (("static", audits), ("adaptive", adaptive))}
    shift_at = min(SHIFT_AT, samples // 2)
    rows = []
    for s, a in zip(runs["static"]["windows"], runs["adaptive"]["windows"], strict=True):
        rows.append([s["start"], s["agreement"], a["agreement"], s["early_share"], a["early_share"], s["cost"],
                     a["cost"], a["thresholds"]["mobile"], a["thresholds"]["edge"]])
    print(table(["from sample", "agreement static", "adaptive", "early static", "adaptive", "cost static",
                 "adaptive", "adaptive tau mobile", "tau edge"], rows))

    def recovered(windows: list[dict[str, Any]]) -> int | None:
        """Samples after the shift until agreement is within 1 point of the target and stays there."""
        after = [w for w in windows if w["start"] >= shift_at]
        for k, w in enumerate(after):
            if all(x["agreement"] is None or x["agreement"] >= target - 0.01 for x in after[k:]):
                return int(w["start"] + WINDOW - shift_at)
        return None

    result = {"target": target, "audit_fraction": fraction, "samples": samples, "shift": shift, "shift_at": shift_at,
              "window": WINDOW, "start_thresholds": starts, "controller": CONTROLLER,
              "model": {"artifacts": str(artifacts), "created": manifest.provenance.created,
                        "thresholds": {e.tier: e.threshold for e in manifest.exits[:-1]}},
              "runs": runs, "recovered_within_samples": {name: recovered(r["windows"]) for name, r in runs.items()},
              "machine": machine()}
    print(f"agreement back within 1 point of {target} and kept, samples after the shift: "
          + ", ".join(f"{name} {value}" for name, value in result["recovered_within_samples"].items())
          + " (goal: adaptive <= 2000, static never)")
    for name, r in runs.items():
        print(f"{name} audits (configured {fraction}): " + ", ".join(
            f"{tier} {v['audited_samples']:.0f} of {v['samples']:.0f} samples ({v['audit_share']:.4f}), "
            f"{v['dropped']:.0f} dropped" for tier, v in r["audits"].items()))
    if out is not None:
        write_result(out, "drift", result)
        _plot(result, out / "drift.png")
    return result


def static_thresholds(artifacts: Path, manifest: Any, target: float) -> dict[str, float]:
    """The build's guaranteed thresholds for `target` agreement with the final exit, on the model's
    calibration split (never on the stream)."""
    probs, labels = calibration_probs(artifacts, manifest)
    chosen = p_tar_thresholds(probs, labels, [target] * (len(TIERS) - 1), DELTA, "consistency")
    return {tier: g.threshold for tier, g in zip(TIERS[:-1], chosen, strict=True)}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, style in (("static", "--"), ("adaptive", "-")):
        windows = result["runs"][name]["windows"]
        x = [w["start"] + result["window"] / 2 for w in windows]
        top.plot(x, [w["agreement"] for w in windows], style, marker="o", label=name)
        bottom.plot(x, [w["cost"] for w in windows], style, marker="o", label=name)
    for axis in (top, bottom):
        axis.axvline(result["shift_at"], color="grey", linewidth=0.8)
        axis.legend()
    top.axhline(result["target"], color="red", linewidth=0.8)
    top.set_ylabel("agreement of early answers\nwith the final exit")
    bottom.set_ylabel("cost vs cloud-only")
    bottom.set_xlabel("sample in the stream (grey: the shift begins)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.95, help="agreement target of both runs")
    parser.add_argument("--audit-fraction", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--shift", choices=("domain", "typos"), default="domain")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT,
                        help="the GLUE data folder holding mrpc/ (default %(default)s)")
    args = parser.parse_args(argv)
    run(args.artifacts, args.data, args.limit, args.out, args.target, args.audit_fraction, args.samples, args.shift,
        args.data_root)


if __name__ == "__main__":
    main()
