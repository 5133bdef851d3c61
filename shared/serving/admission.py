"""Admission control by work: how many samples a tier takes on at once; beyond it, RESOURCE_EXHAUSTED
at once (no queue), so that under overload the work a tier accepts still finishes in time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from shared.errors import Overloaded


class WorkLimit:
    """At most `limit` samples in flight (one event loop: no lock needed)."""

    def __init__(self, limit: int, tier: str) -> None:
        self.limit = limit
        self.tier = tier
        self.current = 0  # samples
        self.calls = 0  # requests holding them

    @contextmanager
    def admit(self, samples: int) -> Iterator[None]:
        """Hold `samples` for the duration of a request, or raise Overloaded at once."""
        if self.current + samples > self.limit:
            raise Overloaded(
                f"the {self.tier} tier is at its limit of {self.limit} samples in flight ({self.current} now, "
                f"{samples} asked); retry later or with fewer samples per request")
        self.current += samples
        self.calls += 1
        try:
            yield
        finally:
            self.current -= samples
            self.calls -= 1
