"""Command-line argument types shared by the tools."""

from __future__ import annotations

import argparse


def threshold_argument(text: str) -> tuple[str, float]:
    """TIER=VALUE (a per-request threshold override), as (tier, value)."""
    tier, _, value = text.partition("=")
    try:
        return tier.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TIER=VALUE like mobile=0.9, got {text!r}") from None
