"""Command-line argument types shared by the tools."""

from __future__ import annotations

import argparse
import math

from shared.contract.policy import DEFAULT_DELTA


def threshold_argument(text: str) -> tuple[str, float]:
    """TIER=VALUE (a per-request threshold override), as (tier, value)."""
    tier, _, value = text.partition("=")
    try:
        return tier.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TIER=VALUE like mobile=0.9, got {text!r}") from None


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The threshold policy's flags, shared by `tierserve build` and `tierserve retune`."""
    p.add_argument("--policy", choices=["cost", "p_tar"], default="cost",
                   help="cost: the cheapest thresholds within --max-drop points of the final exit's accuracy "
                        "(DIMEE's operating point); p_tar: a target per early exit (default: %(default)s)")
    p.add_argument("--max-drop", type=non_negative, default=0.3, action=_Noted,
                   help="cost policy: accuracy drop allowed against the final exit, points (default: %(default)s)")
    p.add_argument("--p-tar", nargs="+", action=_Targets, metavar="MOBILE[,EDGE]", default=(0.9, 0.9),
                   help="p_tar policy: target of the answers at mobile and edge, one value for both "
                        "(default: 0.9); `0.9,0.95` and `0.9 0.95` both work")
    p.add_argument("--target", choices=["accuracy", "consistency"], default="accuracy", action=_Noted,
                   help="p_tar policy: what --p-tar bounds, the answers' accuracy or their agreement with the "
                        "final exit, which needs no labels (default: %(default)s)")
    p.add_argument("--delta", type=_delta, default=DEFAULT_DELTA,
                   help="each guarantee holds with probability >= 1 - delta over the calibration split's draw "
                        "(default: %(default)s)")


# the policy each policy flag applies to: given with the other policy it would be ignored
POLICY_OF_FLAG = {"--p-tar": "p_tar", "--target": "p_tar", "--max-drop": "cost"}


def policy_flags_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the policy flags given (a flag of the policy not chosen), or None."""
    wrong = sorted(f for f in getattr(args, "policy_flags_given", set()) if POLICY_OF_FLAG[f] != args.policy)
    if not wrong:
        return None
    wanted = POLICY_OF_FLAG[wrong[0]]
    return (f"{' and '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to --policy {wanted}, and the "
            f"policy is {args.policy}{' (the default)' if args.policy == 'cost' else ''}: add --policy {wanted}, "
            f"or leave {'it' if len(wrong) == 1 else 'them'} out")


def _note_given(namespace: argparse.Namespace, flag: str | None) -> None:
    given = getattr(namespace, "policy_flags_given", None) or set()
    given.add(flag)
    namespace.policy_flags_given = given


class _Noted(argparse.Action):
    """Stores the value, noting that the flag was given (policy_flags_problem)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        _note_given(namespace, option_string)


class _Targets(argparse.Action):
    """--p-tar as one or two numbers, comma- or space-separated (build took the first, retune the second)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, _two_floats(",".join(values)))  # type: ignore[arg-type]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{option_string}: {exc}")
        _note_given(namespace, option_string)


def non_negative(text: str) -> float:
    """A finite number >= 0 (an accuracy budget, a cost)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _delta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"delta must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"delta {value} must be in (0, 1)")
    return value


def _two_floats(text: str) -> tuple[float, float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one or two numbers like 0.9 or 0.9,0.92, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must be one or two numbers in (0, 1], got {text!r}")
    return values[0], values[1]
