"""Admission control: how much work a tier takes on at once; beyond it, RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

from shared.errors import Overloaded


class InflightLimit:
    """At most `limit` requests at once (one event loop: no lock needed). A context manager."""

    def __init__(self, limit: int, tier: str) -> None:
        self.limit = limit
        self.tier = tier
        self.current = 0

    def __enter__(self) -> InflightLimit:
        """Count a request in, or raise Overloaded at the limit."""
        if self.current >= self.limit:
            raise Overloaded(
                f"the {self.tier} tier is at its limit of {self.limit} requests in flight; retry later")
        self.current += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.current -= 1
