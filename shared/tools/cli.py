"""The `tierserve` command: one argparse subcommand per concern, each registered by its own module.

A subcommand module offers `add_<name>_parser(subparsers)`, which sets `handler`: a function of
the parsed arguments returning the exit status. Heavy imports happen inside handlers, so that
`tierserve --help` and the serving commands never import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from shared.serving.settings import SETTINGS_BY_TIER, add_settings_arguments, settings_from_args
from shared.tools.arguments import threshold_argument

DEFAULT_ENTRY = "127.0.0.1:50051"
CLASSIFY_BATCH = 64


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve one tier (mobile, edge or cloud) in this process",
        description="Serve one tier until SIGTERM/SIGINT. Every flag also reads from the "
                    "environment (TIERSERVE_<TIER>_<FLAG>).")
    tiers = serve.add_subparsers(dest="tier", required=True, metavar="TIER")
    for tier, cls in SETTINGS_BY_TIER.items():
        parser = tiers.add_parser(tier, help=f"serve the {tier} tier")
        add_settings_arguments(parser, cls)
        parser.set_defaults(handler=run_serve, parser=parser)


def run_serve(args: argparse.Namespace) -> int:
    from shared.serving.server import run_tier

    return run_tier(settings_from_args(SETTINGS_BY_TIER[args.tier], args, args.parser))


def add_classify_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify", help="classify texts (or sentence pairs) through the running tiers",
        description="Send texts, or sentence pairs to a pair model, to the mobile tier; print label, confidence, "
                    "exit tier per sample.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify; '-' reads stdin")
    p.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                   help="read texts from FILE, one per line ('-': stdin); repeatable")
    p.add_argument("--pair", action="append", default=[], nargs=2, metavar=("FIRST", "SECOND"),
                   help="a sentence pair for a pair model (paraphrase, entailment); repeatable")
    p.add_argument("--pair-file", action="append", default=[], metavar="FILE",
                   help="read sentence pairs from FILE, one per line, first and second text separated by a tab "
                        "('-': stdin); repeatable")
    p.add_argument("--address", default=DEFAULT_ENTRY, help="the mobile tier (default %(default)s)")
    p.add_argument("--threshold", action="append", default=[], type=threshold_argument,
                   metavar="TIER=VALUE", help="per-request threshold override, e.g. mobile=0.95")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--tls", action="store_true", help="TLS to the mobile tier (implied by --tls-ca/--tls-cert)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that verifies the mobile tier (default: system roots)")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.set_defaults(handler=run_classify)


def read_texts(texts: Iterable[str], files: Iterable[str]) -> list[str]:
    """Texts from the command line and files, one per line; '-' means stdin; blank lines skipped.
    Raises OSError (a file that cannot be read) or ValueError (text that is not UTF-8)."""
    collected: list[str] = []
    for text in texts:
        collected.extend([line for _, line in _numbered_lines("-")] if text == "-" else [_utf8(text, "an argument")])
    for name in files:
        collected.extend(line for _, line in _numbered_lines(name))
    return collected


def _source(name: str) -> str:
    """How messages name a file argument ('-': stdin)."""
    return "stdin" if name == "-" else name


def _numbered_lines(name: str) -> list[tuple[int, str]]:
    """The non-blank lines of file `name` ('-': stdin), with their line numbers."""
    where = _source(name)
    try:
        if name == "-":
            lines = list(sys.stdin)
        else:
            with open(Path(name), encoding="utf-8") as f:
                lines = list(f)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})") from None
    except OSError as exc:
        raise OSError(f"{where}: {exc.strerror or exc}") from None
    return [(number, _utf8(line.rstrip("\r\n"), f"{where}: line {number}"))
            for number, line in enumerate(lines, 1) if line.strip()]


def _utf8(text: str, where: str) -> str:
    """`text` if it is valid Unicode (bytes that were not UTF-8 come in as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    return text


def read_pairs(pairs: Iterable[Sequence[str]], files: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs from --pair and from files of `first<TAB>second` lines; a line without a tab is an error."""
    collected = [(_utf8(first, "--pair"), _utf8(second, "--pair")) for first, second in pairs]
    for name in files:
        for number, line in _numbered_lines(name):
            first, tab, second = line.partition("\t")
            if not tab:
                raise ValueError(f"{_source(name)}: line {number} has no tab between the first and the second text")
            collected.append((first, second))
    return collected


def run_classify(args: argparse.Namespace) -> int:
    import json

    import grpc

    from shared.client import TierClient, not_an_entry_tier

    try:
        texts = read_texts(args.texts, args.file)
        pairs = read_pairs(args.pair, args.pair_file)
    except (OSError, ValueError) as exc:
        print(f"tierserve classify: {exc}", file=sys.stderr)
        return 2
    if texts and pairs:
        print("tierserve classify: give texts or sentence pairs (--pair, --pair-file), not both", file=sys.stderr)
        return 2
    if not texts and not pairs:
        print("tierserve classify: no texts (give TEXT arguments, -f FILE or '-' for stdin; sentence pairs with "
              "--pair FIRST SECOND or --pair-file FILE)", file=sys.stderr)
        return 2
    samples: list[str] | list[tuple[str, str]] = pairs or texts
    thresholds = dict(args.threshold)
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        from shared.wire.tls import ClientTLS

        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
    with TierClient(args.address, timeout=args.timeout, tls=tls) as client:
        for start in range(0, len(samples), CLASSIFY_BATCH):
            batch = samples[start:start + CLASSIFY_BATCH]
            try:
                answers = client.classify_pairs(pairs[start:start + CLASSIFY_BATCH], thresholds) if pairs \
                    else client.classify(texts[start:start + CLASSIFY_BATCH], thresholds)
            except grpc.RpcError as exc:
                wrong_tier = not_an_entry_tier(exc, args.address, tls)
                hint = (" (is it running? `tierserve serve mobile` or `make demo`)"
                        if exc.code() == grpc.StatusCode.UNAVAILABLE else
                        " (here: --pair FIRST SECOND or --pair-file FILE)" if not pairs and "send pairs" in
                        (exc.details() or "") else "")
                print(f"tierserve classify: {wrong_tier}" if wrong_tier else
                      f"tierserve classify: {args.address}: {exc.code().name}: {exc.details()}{hint}",
                      file=sys.stderr)
                return 1
            for sample, answer in zip(batch, answers, strict=True):
                text = sample if isinstance(sample, str) else f"{sample[0]} | {sample[1]}"
                if args.json:
                    given = {"text": sample} if isinstance(sample, str) else {"first": sample[0], "second": sample[1]}
                    print(json.dumps({
                        **given, "label": answer.label, "label_index": answer.label_index,
                        "confidence": answer.confidence, "tier": answer.tier,
                        "exit_layer": answer.exit_layer, "truncated": answer.truncated,
                        "degraded": answer.degraded, "degraded_reason": answer.degraded_reason,
                        "probabilities": list(answer.probabilities)}))
                else:
                    flag = "  (truncated)" if answer.truncated else ""
                    flag += f"  (degraded: {answer.degraded_reason})" if answer.degraded else ""
                    print(f"{answer.label:<12} {answer.confidence:.4f}  {answer.tier:<6}  "
                          f"{text}{flag}")
    return 0


def _command_parsers() -> list[Callable[[argparse._SubParsersAction], None]]:
    from shared.tools.build_command import add_build_parser
    from shared.tools.demo import add_demo_parser
    from shared.tools.retune import add_retune_parser

    return [add_build_parser, add_retune_parser, add_serve_parser, add_classify_parser, add_demo_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierserve", description="Three-tier (mobile / edge / cloud) early-exit serving.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _command_parsers():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
