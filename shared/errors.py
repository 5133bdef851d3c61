"""Errors a user can cause, each with the gRPC status it maps to (mapped in one place: shared.tier)."""

from __future__ import annotations


class TierServeError(Exception):
    """Base class; `code` names a grpc.StatusCode member."""

    code = "INTERNAL"


class InvalidInput(TierServeError):
    code = "INVALID_ARGUMENT"


class TooLarge(TierServeError):
    code = "RESOURCE_EXHAUSTED"


class Overloaded(TierServeError):
    code = "RESOURCE_EXHAUSTED"


class NotReady(TierServeError):
    code = "UNAVAILABLE"


class NotFound(TierServeError):
    """Something asked for by name (a model of the Open Inference Protocol) is not served here."""

    code = "NOT_FOUND"


class ArtifactError(TierServeError):
    """A build artifact is missing, malformed or does not match its recorded hash."""

    code = "FAILED_PRECONDITION"


class BuildInputError(ValueError):
    """Bad input to the builder (data, checkpoint, split points): the message says what to fix."""
