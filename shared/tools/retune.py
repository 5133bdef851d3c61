"""`tierserve retune`: choose new thresholds for a built model without retraining (numpy only).

Reads the calibration split's logits that the build saved, applies the shipped temperatures,
chooses thresholds with the p_tar or the cost-aware policy, and rewrites manifest.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.contract.calibration import softmax
from shared.contract.manifest import CostModel, Manifest, load_calibration_logits, load_manifest, save_manifest
from shared.contract.policy import DROP_CONFIDENCE, choose_policy
from shared.errors import ArtifactError


def retune(folder: Path, policy: str, p_tar: tuple[float, float], max_drop_points: float,
           cost: CostModel | None = None, confidence: float = DROP_CONFIDENCE) -> Manifest:
    manifest = load_manifest(folder)
    logits, labels = load_calibration_logits(folder)
    probs = [softmax(z, e.temperature) for z, e in zip(logits, manifest.exits, strict=True)]
    cost = cost or manifest.cost_model
    thresholds, spec = choose_policy(policy, probs, labels, manifest.split_points(), cost, p_tar, max_drop_points,
                                     confidence)
    for exit_spec, tau in zip(manifest.exits, thresholds, strict=False):
        exit_spec.threshold = tau
    manifest.policy, manifest.cost_model = spec, cost
    save_manifest(manifest, folder)
    return manifest


def add_retune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("retune", help="choose new exit thresholds for a built model (no retraining)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/default"))
    p.add_argument("--policy", choices=["p_tar", "cost"], default="cost")
    p.add_argument("--p-tar", type=float, nargs=2, default=(0.9, 0.9), metavar=("MOBILE", "EDGE"))
    p.add_argument("--max-drop", type=float, default=0.3, help="cost policy: accuracy drop allowed, points")
    p.add_argument("--confidence", type=_confidence, default=DROP_CONFIDENCE,
                   help="cost policy: confidence that the drop holds on new data, in [0.5, 1); 0.5 keeps it "
                        "only on the calibration split (default %(default)s)")
    p.add_argument("--layer-cost", type=float, nargs=3, metavar=("MOBILE", "EDGE", "CLOUD"),
                   help="compute cost per layer at each tier (default: the manifest's)")
    p.add_argument("--hop-cost", type=float, nargs=3, metavar=("MOBILE_EDGE", "EDGE_CLOUD", "MOBILE_CLOUD"),
                   help="offloading cost per hop (default: the manifest's)")
    p.set_defaults(handler=run_retune)


def _confidence(text: str) -> float:
    value = float(text)
    if not 0.5 <= value < 1:
        raise argparse.ArgumentTypeError(f"confidence {value} must be in [0.5, 1)")
    return value


def run_retune(args: argparse.Namespace) -> int:
    try:
        cost = load_manifest(args.artifacts).cost_model
        if args.layer_cost:
            cost.layer_cost = dict(zip(("mobile", "edge", "cloud"), args.layer_cost, strict=True))
        if args.hop_cost:
            cost.hop_cost = dict(zip(("mobile_edge", "edge_cloud", "mobile_cloud"), args.hop_cost, strict=True))
        manifest = retune(args.artifacts, args.policy, tuple(args.p_tar), args.max_drop, cost, args.confidence)
    except ArtifactError as exc:
        print(f"tierserve retune: {exc}", file=sys.stderr)
        return 2
    taus = ", ".join(f"{e.tier} {e.threshold:.4f}" for e in manifest.exits[:-1])
    print(f"policy {manifest.policy.kind}: thresholds {taus}; on the calibration split expected cost "
          f"{manifest.policy.expected_cost:.3f} of cloud-only, accuracy {manifest.policy.expected_accuracy:.4f}")
    print(f"wrote {args.artifacts / 'manifest.json'} (restart or reload the tiers to apply)")
    return 0
