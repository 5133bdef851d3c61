"""Drift: a stream of SST-2 dev sentences that shifts part-way, served with static and with adaptive
thresholds (shared.serving.controller) at the same agreement target, both with the same audits.
The shift (--shift): `domain`, sentences of another domain (news, GLUE MRPC's first sentences)
mixed in at a rising rate until they are all the stream; `typos`, progressively corrupted text
(swapped, dropped, doubled letters; dropped words); or `contrast`, mixed reviews mixed in at a
rising rate: two dev sentences of opposite sentiment joined by "but", meant as inputs whose
sentiment turns on the word "but" (on the quick model the early exits agree with the final exit
far less often on them). --seed draws another stream.

Both runs start from the same thresholds, the build's guaranteed search for the target's agreement
with the final exit on the model's calibration split (policy.p_tar_thresholds, "consistency"): the
thresholds a build for this target would ship; the static run keeps them, the adaptive one lets its
controller (CONTROLLER, for a stream of 8,000 samples: not the server's defaults, which are for
long-running traffic audited at a few percent) move them. --replay N replays the adaptive run
offline instead, to compare controller settings (--controller NAME=VALUE).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import (
    FORCE_CLOUD,
    base_parser,
    calibration_probs,
    classify_all,
    dev_set,
    exit_probabilities,
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
# The adaptive run's controller. The stream shifts within a few thousand samples, so the window is
# a few hundred audits and an update comes every few dozen; it rises faster than it falls, and falls
# slower than the server's default, so that a window still holding pre-shift audits does not pull
# a threshold back down before the shifted traffic fills it. Chosen with --replay on the contrast
# shift; the former settings are in bench/results/drift/drift-contrast-095-replay-former.json.
CONTROLLER = {"controller_every": 25, "controller_min_samples": 200, "controller_window": 400,
              "controller_max_raise": 0.05, "controller_max_lower": 0.01, "controller_floor": 0.5,
              "controller_ceiling": 1.0}


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


def mixed_reviews(texts: list[str], labels: list[int], count: int, seed: int = 0) -> list[str]:
    """`count` reviews "A , but B", A and B dev sentences of different labels, either first at random."""
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        by_label.setdefault(int(label), []).append(text)
    if len(by_label) < 2:
        raise ValueError("a contrast shift needs texts of at least two labels")
    reviews = []
    for _ in range(count):
        first, second = rng.sample(sorted(by_label), 2)
        reviews.append(f"{rng.choice(by_label[first]).strip().rstrip(' .')} , but {rng.choice(by_label[second])}")
    return reviews


def other_domain(data_root: Path) -> list[str]:
    """GLUE MRPC's first sentences (news), as GLUE distributes them (a byte-order mark included)."""
    import csv

    with open(data_root / "mrpc" / "train.tsv", encoding="utf-8-sig", newline="") as f:
        return [row["#1 String"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def window_figures(start: int, exits: np.ndarray, agreeing: np.ndarray, manifest: Any) -> dict[str, Any]:
    """One window of the stream: the agreement of its early answers with the final exit (`agreeing`:
    per sample, whether the exit that answered gave the final exit's label), their share, and the cost."""
    early = exits < len(TIERS) - 1
    fractions = np.bincount(exits, minlength=len(TIERS)) / len(exits)
    return {"start": start, "agreement": float(agreeing[early].mean()) if early.any() else None,
            "early_share": float(early.mean()),
            "cost": relative_cost(fractions, manifest.split_points(), manifest.cost_model)}


def _serve(artifacts: Path, stream: list[str], final: np.ndarray, flags: dict[str, dict[str, object]],
           manifest: Any) -> dict[str, Any]:
    windows = []
    with tiers(artifacts, flags) as cluster, TierClient(cluster.entry_address, timeout=60) as client:
        for start in range(0, len(stream), WINDOW):
            answers = [a for i in range(start, min(start + WINDOW, len(stream)), BATCH)
                       for a in client.classify(stream[i:min(i + BATCH, start + WINDOW)])]
            exits = np.array([TIERS.index(a.tier) for a in answers])
            labels = np.array([a.label_index for a in answers])
            thresholds = {tier: scrape(cluster.tiers[tier].metrics_port)[
                ("tierserve_exit_threshold", (("tier", tier),))] for tier in TIERS[:-1]}
            windows.append(window_figures(start, exits, labels == final[start:start + len(answers)], manifest)
                           | {"thresholds": thresholds})
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


def shifted_stream(manifest: Any, data: str | None, limit: int | None, samples: int, shift: str,
                   data_root: Path, seed: int = 0) -> list[str]:
    texts, labels = dev_set(manifest, data, limit)
    other = other_domain(data_root) if shift == "domain" else \
        mixed_reviews(list(texts), list(labels), len(texts), seed) if shift == "contrast" else None
    return drift_stream(list(texts), samples, shift_start(samples), seed, other=other)


def shift_start(samples: int) -> int:
    """Where the shift begins in a stream of `samples`: SHIFT_AT, or half-way through a shorter one."""
    return min(SHIFT_AT, samples // 2)


def recovered(windows: list[dict[str, Any]], shift_at: int, target: float) -> int | None:
    """Samples after the shift until agreement is within 1 point of the target and stays there."""
    after = [w for w in windows if w["start"] >= shift_at]
    for k, w in enumerate(after):
        if all(x["agreement"] is None or x["agreement"] >= target - 0.01 for x in after[k:]):
            return int(w["start"] + WINDOW - shift_at)
    return None


def run(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
        target: float = 0.95, fraction: float = 0.2, samples: int = SAMPLES, shift: str = "domain",
        data_root: Path = DATA_ROOT, seed: int = 0) -> dict[str, Any]:
    manifest = load(artifacts)
    stream = shifted_stream(manifest, data, limit, samples, shift, data_root, seed)
    starts = static_thresholds(artifacts, manifest, target)
    with tiers(artifacts) as cluster:
        final = np.array([a.label_index for a in classify_all(cluster.entry_address, stream, FORCE_CLOUD)])
    audits = {"audit_fraction": fraction, "audit_budget_samples": 64, "agreement_target": target,
              "audit_delta": DELTA}
    adaptive = {**audits, "threshold_controller": "true", **CONTROLLER}
    runs = {name: _serve(artifacts, stream, final, {tier: {**flags, "threshold": starts[tier]} for tier in starts},
                         manifest)
            for name, flags in (("static", audits), ("adaptive", adaptive))}
    shift_at = shift_start(samples)
    rows = []
    for s, a in zip(runs["static"]["windows"], runs["adaptive"]["windows"], strict=True):
        rows.append([s["start"], s["agreement"], a["agreement"], s["early_share"], a["early_share"], s["cost"],
                     a["cost"], a["thresholds"]["mobile"], a["thresholds"]["edge"]])
    print(table(["from sample", "agreement static", "adaptive", "early static", "adaptive", "cost static",
                 "adaptive", "adaptive tau mobile", "tau edge"], rows))

    result = {"target": target, "audit_fraction": fraction, "samples": samples, "shift": shift, "shift_at": shift_at,
              "seed": seed, "window": WINDOW, "start_thresholds": starts, "controller": CONTROLLER,
              "model": {"artifacts": str(artifacts), "created": manifest.provenance.created,
                        "thresholds": {e.tier: e.threshold for e in manifest.exits[:-1]}},
              "runs": runs, "recovered_within_samples": {name: recovered(r["windows"], shift_at, target)
                                           for name, r in runs.items()},
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


def replay(artifacts: Path, data: str | None = None, limit: int | None = None, out: Path | None = None,
           target: float = 0.95, fraction: float = 0.2, samples: int = SAMPLES, shift: str = "domain",
           data_root: Path = DATA_ROOT, draws: int = 10, controller: Mapping[str, float] | None = None,
           seed: int = 0) -> dict[str, Any]:
    """The adaptive run replayed offline, `draws` times: every exit's calibrated probabilities for the
    stream come from the running tiers once, then `replay_exits` routes it, each draw with its own
    audit seed. Cheap enough to compare controller settings on one stream; the served run (`run`)
    is the measurement: there an audit reaches the controller only after its round trip, and the
    thresholds hold for a request of BATCH samples."""
    unknown = set(controller or {}) - set(CONTROLLER)
    if unknown:
        raise ValueError(f"unknown controller settings {sorted(unknown)}; known: {sorted(CONTROLLER)}")
    settings = {name: type(CONTROLLER[name])(value) for name, value in {**CONTROLLER, **(controller or {})}.items()}
    manifest = load(artifacts)
    stream = shifted_stream(manifest, data, limit, samples, shift, data_root, seed)
    starts = static_thresholds(artifacts, manifest, target)
    with tiers(artifacts) as cluster:
        probs = exit_probabilities(cluster.entry_address, stream)
    final = probs[-1].argmax(-1)
    confidence = [p.max(-1) for p in probs[:-1]]
    agrees = [p.argmax(-1) == final for p in probs[:-1]]
    shift_at = shift_start(samples)
    results: list[dict[str, Any]] = []
    for draw in range(draws):
        controllers, auditors = adaptive_exits(starts, target, fraction, settings, draw)
        exits = replay_exits(confidence, agrees, controllers, auditors)
        windows: list[dict[str, Any]] = []
        for start in range(0, len(stream), WINDOW):
            e = exits[start:start + WINDOW]
            agreeing = np.choose(np.minimum(e, len(TIERS) - 2), [a[start:start + WINDOW] for a in agrees])
            windows.append(window_figures(start, e, agreeing, manifest))
        back = recovered(windows, shift_at, target)
        agreement_after = [w["agreement"] for w in windows if w["start"] >= shift_at and w["agreement"] is not None]
        results.append({"draw": draw, "recovered_within_samples": back,
                         "lowest_agreement_after_shift": min(agreement_after, default=None),
                         "cost_after_ramp": float(np.mean(after)) if (after := [
                             w["cost"] for w in windows if w["start"] >= shift_at + RAMP]) else None,
                         "windows": windows})
    print(table(["draw", "recovered within (samples)", "lowest agreement after the shift", "mean cost after the ramp"],
                [[r["draw"], r["recovered_within_samples"], r["lowest_agreement_after_shift"], r["cost_after_ramp"]]
                 for r in results]))
    within = sum(1 for r in results if r["recovered_within_samples"] is not None
                 and r["recovered_within_samples"] <= 2000)
    print(f"replayed {draws} audit draws, controller {settings}: agreement back within 1 point of {target} "
          f"and kept within 2,000 samples in {within} of {draws}")
    result = {"target": target, "audit_fraction": fraction, "samples": samples, "shift": shift, "shift_at": shift_at,
              "seed": seed, "window": WINDOW, "start_thresholds": starts, "controller": settings, "draws": results,
              "within_2000": within, "machine": machine()}
    if out is not None:
        write_result(out, "drift-replay", result)
    return result


def adaptive_exits(starts: Mapping[str, float], target: float, fraction: float, settings: Mapping[str, float],
                   seed: int) -> tuple[list[Any], list[Any]]:
    """A ThresholdController and an Auditor per early exit, as a tier with these flags makes them."""
    from shared.serving.audit import Auditor
    from shared.serving.controller import ThresholdController
    from shared.serving.metrics import TierMetrics

    controllers, auditors = [], []
    for k, tier in enumerate(TIERS[:-1]):
        metrics = TierMetrics(tier)
        controllers.append(ThresholdController.from_settings(
            tier, metrics, starts[tier], SimpleNamespace(**settings, agreement_target=target, audit_delta=DELTA)))
        auditors.append(Auditor(tier, metrics, _no_send, fraction, budget=1, rng=random.Random(1000 * seed + k)))
    return controllers, auditors


def replay_exits(confidence: Sequence[np.ndarray], agrees: Sequence[np.ndarray], controllers: Sequence[Any],
                 auditors: Sequence[Any]) -> np.ndarray:
    """The exit of every sample, in stream order, as the tiers route it: each early exit offers every
    sample that reaches it to its auditor (answered or forwarded), an audited sample's confidence and
    agreement reach its controller, and the sample exits at the first exit whose threshold in force
    its confidence meets."""
    exits = np.full(len(confidence[0]), len(TIERS) - 1)
    for i in range(len(exits)):
        for k, (controller, auditor) in enumerate(zip(controllers, auditors, strict=True)):
            answered = confidence[k][i] >= controller.threshold
            if auditor.pick([i], load=0.0):
                controller.observe(float(confidence[k][i]), bool(agrees[k][i]))
            if answered:
                exits[i] = k
                break
    return exits


async def _no_send(*args: object, **kwargs: object) -> list[Any]:
    raise AssertionError("a replay sends no audits")


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
    parser.add_argument("--shift", choices=("domain", "typos", "contrast"), default="domain")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT,
                        help="the GLUE data folder holding mrpc/ (default %(default)s)")
    parser.add_argument("--replay", type=int, metavar="DRAWS", default=0,
                        help="replay the adaptive run offline this many times (audit draws) instead of serving it")
    parser.add_argument("--controller", nargs="*", default=[], metavar="NAME=VALUE",
                        help="with --replay: controller settings other than CONTROLLER's, e.g. controller_window=800")
    parser.add_argument("--seed", type=int, default=0, help="the stream's draw (corruptions, mixing, mixed reviews)")
    args = parser.parse_args(argv)
    if args.replay:
        if any("=" not in item for item in args.controller):
            parser.error(f"--controller takes NAME=VALUE items, got {args.controller}")
        overrides = dict(item.split("=", 1) for item in args.controller)
        replay(args.artifacts, args.data, args.limit, args.out, args.target, args.audit_fraction, args.samples,
               args.shift, args.data_root, args.replay, {k: float(v) for k, v in overrides.items()}, args.seed)
        return
    run(args.artifacts, args.data, args.limit, args.out, args.target, args.audit_fraction, args.samples, args.shift,
        args.data_root, args.seed)


if __name__ == "__main__":
    main()
