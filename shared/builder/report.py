"""The build report: report.json, a printed summary, reliability diagrams and a cost/accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shared.contract.calibration import expected_calibration_error, reliability_bins, softmax  # noqa: E402
from shared.contract.manifest import CostModel, PolicySpec  # noqa: E402
from shared.contract.policy import describe_policy, holdout_line, relative_cost, route  # noqa: E402


def write_report(folder: Path, report: dict[str, Any]) -> Path:
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def summary_text(report: dict[str, Any]) -> str:
    lines = [
        f"{'exit':<7}{'layer':>6}{'acc':>8}{'ECE before':>12}{'ECE after':>11}{'90% interval':>17}{'T':>7}"
        f"{'kept':>6}{'tau':>8}{'exits':>8}{'exit acc':>10}"
    ]
    for i, e in enumerate(report["exits"]):
        last = i == len(report["exits"]) - 1
        tau = "always" if last else "never" if e["threshold"] > 1 else f"{e['threshold']:.3f}"
        lines.append(
            f"{e['tier']:<7}{e['layer']:>6}{e['accuracy']:>8.4f}{e['ece_before']:>12.4f}{e['ece_after']:>11.4f}"
            f"{_interval(e.get('ece_after_interval')):>17}{e['temperature']:>7.3f}"
            f"{'yes' if e['temperature_kept'] else 'no':>6}{tau:>8}"
            f"{e['exit_fraction']:>8.3f}{_fmt(e['exited_accuracy']):>10}"
        )
    lines.append(
        f"on the test split: system accuracy {report['system_accuracy']:.4f} vs final exit "
        f"{report['final_accuracy']:.4f} (drop {report['accuracy_drop_points']:+.2f} points); cost "
        f"{report['relative_cost']:.3f} of cloud-only (the test split's exits priced by the cost model)"
    )
    if report.get("holdout"):
        lines.append(holdout_line(report["holdout"]))
    lines.append(data_line(report))
    lines.append(describe_policy(PolicySpec.model_validate(report["policy"]))
                 + " (choose another with `tierserve retune`, e.g. --policy p_tar --p-tar 0.9)")
    return "\n".join(lines)


def data_line(report: dict[str, Any]) -> str:
    """"trained on N sentences from X, calibrated on M, evaluated on the test split (Y); built in S s"."""
    provenance = report.get("provenance") or {}
    unit = "images" if report.get("family") == "image" else "sentence pairs" if report.get("text_pairs") \
        else "sentences"
    train = report.get("train_data") or provenance.get("data", "?")
    test = report.get("test_data") or report.get("test_split", "?")
    n_train, n_calib, n_test = (provenance.get(k) for k in ("train_samples", "calibration_samples", "test_samples"))
    trained = f"trained on {n_train} {unit} from {train}" if n_train is not None else f"trained on {train}"
    calibrated = f", calibrated on {n_calib} held out of train" if n_calib is not None else ""
    tested = f"{n_test} from {test}" if n_test is not None else test
    return f"{trained}{calibrated}, evaluated on the test split ({tested}); built in {report['build_seconds']:.0f} s"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _interval(bounds: list[float] | None) -> str:
    return "-" if not bounds else f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def plot_reliability(path: Path, tiers: list[str], logits: list[np.ndarray], labels: np.ndarray,
                     temperatures: list[float], ece_intervals: list[list[float]] | None = None) -> None:
    """Accuracy against confidence per bin, before and after calibration, with the calibrated
    bins' sample counts (bars, right axis; numbers by the points): a bin of 5 samples that sits
    off the diagonal says little, one of 500 says a lot."""
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.6 * len(tiers), 4.4), squeeze=False)
    for i, (ax, tier, z, t) in enumerate(zip(axes[0], tiers, logits, temperatures, strict=True)):
        lowest = 1.0 / z.shape[-1]  # confidence of a uniform guess: 0.5 for two classes
        counts = ax.twinx()
        for temp, style, name in ((1.0, "o--", "uncalibrated"), (t, "s-", f"T = {t:.2f}")):
            bins = reliability_bins(softmax(z, temp), labels)
            filled = bins.count > 0
            ax.plot(bins.confidence[filled], bins.accuracy[filled], style, label=name, markersize=4)
        # the shipped temperature's bins: their counts, as bars and as numbers
        width = bins.edges[1] - bins.edges[0]
        counts.bar(bins.edges[:-1] + width / 2, bins.count, width=width * 0.9, color="0.85", zorder=0)
        counts.set_ylabel("samples per bin (T shipped)", fontsize=8)
        counts.set_ylim(0, max(1, bins.count.max()) * 4)  # bars stay in the lower quarter
        for x, y, c in zip(bins.confidence[filled], bins.accuracy[filled], bins.count[filled], strict=True):
            ax.annotate(str(int(c)), (x, y), textcoords="offset points", xytext=(0, -11), ha="center", fontsize=6)
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        title = f"{tier} exit"
        if ece_intervals is not None:
            lo, hi = ece_intervals[i]
            title += f"\nECE after {expected_calibration_error(softmax(z, t), labels):.3f} (90% CI {lo:.3f}-{hi:.3f})"
        ax.set(title=title, xlabel="confidence", ylabel="accuracy", xlim=(max(0.0, lowest - 0.05), 1.0),
               ylim=(min(0.3, lowest), 1.0))
        ax.title.set_fontsize(9)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(path: Path, probs: list[np.ndarray], labels: np.ndarray, chosen: list[float],
                  split_points: tuple[int, int, int], cost: CostModel) -> None:
    """Accuracy against relative cost as one threshold sweeps both exits, with the chosen point."""
    points = []
    for tau in np.linspace(1.0 / probs[0].shape[-1], 1.0, 51):
        r = route(probs, [tau, tau])
        points.append((relative_cost(r.fractions(), split_points, cost), float(np.mean(r.prediction == labels))))
    r = route(probs, chosen)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(*zip(*points, strict=True), ".-", label="one threshold for both exits")
    ax.plot(relative_cost(r.fractions(), split_points, cost), np.mean(r.prediction == labels), "r*",
            markersize=12, label="chosen thresholds")
    ax.axhline(np.mean(probs[-1].argmax(-1) == labels), color="grey", linestyle=":", label="final exit")
    ax.set(xlabel="expected cost relative to cloud-only", ylabel="accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
