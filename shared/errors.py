"""Errors a user can cause, each with the gRPC status it maps to (mapped in one place: shared.serving.tier)."""

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


class DeadlineExceeded(TierServeError):
    code = "DEADLINE_EXCEEDED"


class NotFound(TierServeError):
    """Something asked for by name (a model of the Open Inference Protocol) is not served here."""

    code = "NOT_FOUND"


class SliceFailure(TierServeError):
    """A tier's own slice failed on a valid input (e.g. produced NaN): the tier's error, never an answer."""

    code = "INTERNAL"


class ArtifactError(TierServeError):
    """A build artifact is missing, malformed or does not match its recorded hash."""

    code = "FAILED_PRECONDITION"


class Undecodable:
    """What the lenient parser hands the servicer when the request's bytes do not parse."""

    def __init__(self, message_type: str, size: int, error: Exception) -> None:
        self.message_type = message_type
        self.size = size
        self.error = error

    def explain(self) -> str:
        return (f"the request ({self.size} bytes) is not a valid {self.message_type}: {self.error} "
                "(e.g. a string field holding invalid UTF-8)")


class BuildInputError(ValueError):
    """Bad input to the builder (data, checkpoint, split points): the message says what to fix."""
