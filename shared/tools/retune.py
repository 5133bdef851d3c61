"""`tierserve retune`: choose new thresholds for a built model without retraining (numpy only).

Reads the calibration split's logits that the build saved, applies the shipped temperatures,
chooses thresholds with the p_tar or the cost-aware policy (with the same guarantee as the build),
and writes manifest.json and report.json together: into a copy of the model (--out), or in place
(--in-place). The report's test-split figures (exit shares, system accuracy, cost) are recomputed from
the test logits the build saved (test_logits.npz); a build older than that file gets a report whose
figures are marked as the build's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from shared.builder.config import HOLDOUT_LOGITS_FILE, TEST_LOGITS_FILE
from shared.contract.calibration import softmax
from shared.contract.manifest import (
    CostModel,
    Manifest,
    load_calibration_logits,
    load_exit_logits,
    load_manifest,
    save_manifest,
)
from shared.contract.policy import (
    DEFAULT_DELTA,
    Target,
    choose_policy,
    cloud_only_cost,
    describe_policy,
    holdout_line,
    routed_figures,
)
from shared.errors import ArtifactError
from shared.tools.arguments import add_policy_arguments, non_negative, policy_flags_problem


def retune(folder: Path, policy: str, p_tar: tuple[float, float], max_drop_points: float,
           cost: CostModel | None = None, delta: float = DEFAULT_DELTA, target: Target = "accuracy",
           out: Path | None = None) -> Manifest:
    """New thresholds for the model in `folder`, written to `out` (a copy of the folder) or, without it, in place."""
    manifest = load_manifest(folder)
    logits, labels = load_calibration_logits(folder)
    probs = [softmax(z, e.temperature) for z, e in zip(logits, manifest.exits, strict=True)]
    cost = cost or manifest.cost_model
    thresholds, spec = choose_policy(policy, probs, labels, manifest.split_points(), cost, p_tar, max_drop_points,
                                     delta, target)
    for exit_spec, tau in zip(manifest.exits, thresholds, strict=False):
        exit_spec.threshold = tau
    manifest.policy, manifest.cost_model = spec, cost
    target_folder = folder
    if out is not None:
        if out.exists():  # the model's own folder too: rewriting it is what --in-place says
            raise ArtifactError(f"{out} exists: retune writes a new folder (pass another --out, or --in-place)")
        shutil.copytree(folder, out)
        target_folder = out
    save_manifest(manifest, target_folder)
    refresh_report(target_folder, manifest)
    return manifest


def saved_split_figures(path: Path, manifest: Manifest) -> dict[str, Any]:
    """routed_figures of a split whose logits the build saved, at the manifest's temperatures and thresholds."""
    logits, labels = load_exit_logits(path)
    probs = [softmax(z, e.temperature) for z, e in zip(logits, manifest.exits, strict=True)]
    return routed_figures(probs, labels, [e.threshold for e in manifest.exits[:-1]], manifest.split_points(),
                          manifest.cost_model)


def refresh_report(folder: Path, manifest: Manifest) -> None:
    """report.json after new thresholds: the policy and, from test_logits.npz, the test split's exit shares,
    system accuracy, drop and cost; without that file (an older build), those figures are marked stale."""
    path = folder / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    report["policy"], report["cost_model"] = manifest.policy.model_dump(), manifest.cost_model.model_dump()
    for entry, spec in zip(report.get("exits", []), manifest.exits, strict=False):
        entry["threshold"] = spec.threshold
    test_file = folder / TEST_LOGITS_FILE
    if test_file.is_file():
        test = saved_split_figures(test_file, manifest)
        for entry, share, accuracy in zip(report.get("exits", []), test["exit_fraction"], test["exited_accuracy"],
                                          strict=False):
            entry["exit_fraction"], entry["exited_accuracy"] = share, accuracy
        report["system_accuracy"] = test["system_accuracy"]
        report["accuracy_drop_points"] = 100.0 * (report["final_accuracy"] - report["system_accuracy"])
        report["relative_cost"] = test["relative_cost"]
        report.pop("stale", None)
    else:
        report["stale"] = ("retuned: exit_fraction, exited_accuracy, system_accuracy, accuracy_drop_points and "
                           "relative_cost are the build's thresholds' (no test_logits.npz: rebuild to refresh them)")
    holdout_file = folder / HOLDOUT_LOGITS_FILE
    if holdout_file.is_file():
        report["holdout"] = saved_split_figures(holdout_file, manifest)
    report["retuned"] = True
    path.write_text(json.dumps(report, indent=2) + "\n")


def add_retune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retune", help="choose new exit thresholds for a built model (no retraining)",
        description="Choose new exit thresholds from the calibration logits a build saved (numpy only, no "
                    "retraining), with the same policies and guarantee as `tierserve build`. The default policy "
                    "is the build's default, DIMEE's operating point: the cheapest thresholds within a 0.3-point "
                    "accuracy drop against the final exit, with probability >= 0.9 (--policy cost --max-drop 0.3 "
                    "--delta 0.1). Writes manifest.json and report.json together, into a copy (--out) or in place "
                    "(--in-place); restart or reload the tiers to apply.")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/default"),
                   help="the built model to re-tune (default: %(default)s)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write the re-tuned model to this new folder (a copy: slices, "
                                                "tokenizer, manifest and report); the original is left as it was")
    where.add_argument("--in-place", action="store_true",
                       help="rewrite the model's own manifest.json and report.json")
    add_policy_arguments(p)
    p.add_argument("--layer-cost", type=non_negative, nargs=3, metavar=("MOBILE", "EDGE", "CLOUD"),
                   help="compute cost per layer at each tier (default: the manifest's, 0.1 each unless built "
                        "otherwise)")
    p.add_argument("--hop-cost", type=non_negative, nargs=3, metavar=("MOBILE_EDGE", "EDGE_CLOUD", "MOBILE_CLOUD"),
                   help="offloading cost per hop (default: the manifest's, 0.3 each unless built otherwise)")
    p.set_defaults(handler=run_retune)


def run_retune(args: argparse.Namespace) -> int:
    if problem := policy_flags_problem(args):
        print(f"tierserve retune: {problem}", file=sys.stderr)
        return 2
    try:
        source = load_manifest(args.artifacts)
        cost = source.cost_model
        if args.layer_cost:
            cost.layer_cost = dict(zip(("mobile", "edge", "cloud"), args.layer_cost, strict=True))
        if args.hop_cost:
            cost.hop_cost = dict(zip(("mobile_edge", "edge_cloud", "mobile_cloud"), args.hop_cost, strict=True))
        if cloud_only_cost(source.split_points(), cost) <= 0:
            raise ArtifactError("the costs make cloud-only free (every cost is relative to it): give the cloud's "
                                "layers or the mobile-cloud hop a cost above 0")
        manifest = retune(args.artifacts, args.policy, tuple(args.p_tar), args.max_drop, cost, args.delta,
                          args.target, out=args.out)
    except ArtifactError as exc:
        print(f"tierserve retune: {exc}", file=sys.stderr)
        return 2
    written = args.out or args.artifacts
    taus = ", ".join(f"{e.tier} {'never' if e.threshold > 1 else f'{e.threshold:.4f}'}" for e in manifest.exits[:-1])
    print(describe_policy(manifest.policy))
    print(f"thresholds {taus}; on the calibration split expected cost {manifest.policy.expected_cost:.3f} of "
          f"cloud-only, accuracy {manifest.policy.expected_accuracy:.4f}")
    try:
        report = json.loads((written / "report.json").read_text())
        if "stale" not in report:
            print(f"on the test split: system accuracy {report['system_accuracy']:.4f}, cost "
                  f"{report['relative_cost']:.3f} of cloud-only")
        if report.get("holdout"):
            print(holdout_line(report["holdout"]))
    except (OSError, ValueError, KeyError):
        pass
    print(f"wrote {written / 'manifest.json'} and report.json (restart or reload the tiers to apply)")
    return 0
