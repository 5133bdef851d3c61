"""`tierserve retune`: choose new thresholds for a built model without retraining (numpy only).

Reads the calibration split's logits that the build saved, applies the shipped temperatures,
chooses thresholds with the p_tar or the cost-aware policy (with the same guarantee as the build),
and rewrites manifest.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.contract.calibration import softmax
from shared.contract.manifest import CostModel, Manifest, load_calibration_logits, load_manifest, save_manifest
from shared.contract.policy import DEFAULT_DELTA, Target, choose_policy, describe_policy
from shared.errors import ArtifactError
from shared.tools.arguments import add_policy_arguments


def retune(folder: Path, policy: str, p_tar: tuple[float, float], max_drop_points: float,
           cost: CostModel | None = None, delta: float = DEFAULT_DELTA, target: Target = "accuracy") -> Manifest:
    manifest = load_manifest(folder)
    logits, labels = load_calibration_logits(folder)
    probs = [softmax(z, e.temperature) for z, e in zip(logits, manifest.exits, strict=True)]
    cost = cost or manifest.cost_model
    thresholds, spec = choose_policy(policy, probs, labels, manifest.split_points(), cost, p_tar, max_drop_points,
                                     delta, target)
    for exit_spec, tau in zip(manifest.exits, thresholds, strict=False):
        exit_spec.threshold = tau
    manifest.policy, manifest.cost_model = spec, cost
    save_manifest(manifest, folder)
    return manifest


def add_retune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("retune", help="choose new exit thresholds for a built model (no retraining)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/default"))
    add_policy_arguments(p)
    p.add_argument("--layer-cost", type=float, nargs=3, metavar=("MOBILE", "EDGE", "CLOUD"),
                   help="compute cost per layer at each tier (default: the manifest's)")
    p.add_argument("--hop-cost", type=float, nargs=3, metavar=("MOBILE_EDGE", "EDGE_CLOUD", "MOBILE_CLOUD"),
                   help="offloading cost per hop (default: the manifest's)")
    p.set_defaults(handler=run_retune)


def run_retune(args: argparse.Namespace) -> int:
    try:
        cost = load_manifest(args.artifacts).cost_model
        if args.layer_cost:
            cost.layer_cost = dict(zip(("mobile", "edge", "cloud"), args.layer_cost, strict=True))
        if args.hop_cost:
            cost.hop_cost = dict(zip(("mobile_edge", "edge_cloud", "mobile_cloud"), args.hop_cost, strict=True))
        manifest = retune(args.artifacts, args.policy, tuple(args.p_tar), args.max_drop, cost, args.delta,
                          args.target)
    except ArtifactError as exc:
        print(f"tierserve retune: {exc}", file=sys.stderr)
        return 2
    taus = ", ".join(f"{e.tier} {'never' if e.threshold > 1 else f'{e.threshold:.4f}'}" for e in manifest.exits[:-1])
    print(describe_policy(manifest.policy))
    print(f"thresholds {taus}; on the calibration split expected cost {manifest.policy.expected_cost:.3f} of "
          f"cloud-only, accuracy {manifest.policy.expected_accuracy:.4f}")
    print(f"wrote {args.artifacts / 'manifest.json'} (restart or reload the tiers to apply)")
    return 0
