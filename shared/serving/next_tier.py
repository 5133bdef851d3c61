"""The call from one tier to the next over gRPC, and how it fails (NextTierError)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from shared.errors import TierServeError
from shared.serving.streaming import AsyncCalls
from shared.wire.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb2, pb2_grpc
from shared.wire.tls import ClientTLS, aio_channel

# Statuses of the next tier passed on as they are; any other failure there is this tier's fault.
_PASSED_ON = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


class NextTierError(TierServeError):
    """The call to the next tier failed; `code` is the status this tier answers with.

    next_status: the status the next tier's call ended with (None: not a gRPC failure);
    kind: why, in a word (shared.serving.resilience: unavailable, deadline, overloaded, circuit_open, error).
    """

    def __init__(self, message: str, code: str = "INTERNAL", kind: str = "error",
                 next_status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.next_status = next_status


def reconnect_options(max_backoff_ms: int = 250) -> list[tuple[str, Any]]:
    """Channel options so that a restarted next tier is reconnected to within max_backoff_ms.

    gRPC's defaults back off up to 120 s between connection attempts; between tiers that would
    keep a restarted tier unused for minutes. Calls fail fast (no wait_for_ready) while the
    channel is down: the circuit breaker and degraded answers handle that time.
    """
    initial = min(100, max_backoff_ms)
    return [("grpc.initial_reconnect_backoff_ms", initial),
            ("grpc.min_reconnect_backoff_ms", max(1000, initial)),  # also the connect timeout
            ("grpc.max_reconnect_backoff_ms", max_backoff_ms)]


class ContinuationClient:
    """The call from one tier to the next (asyncio). Failures raise NextTierError.

    transport "stream" (the default) multiplexes calls on one long-lived ContinueStream
    (shared.serving.streaming; Continue for a next tier without it), "unary" one Continue call each.
    """

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: ClientTLS | None = None, max_reconnect_backoff_ms: int = 250,
                 transport: str = "stream") -> None:
        self.address = address
        self._channel = aio_channel(
            address, [*channel_options(max_message_bytes),
                      *reconnect_options(max_reconnect_backoff_ms)], tls)
        stub = pb2_grpc.ContinuationStub(self._channel)
        self._calls = AsyncCalls(stub.ContinueStream, stub.Continue, f"next tier at {address}", transport)

    async def continue_batch(self, tensors: Mapping[str, pb2.Tensor], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None
                             ) -> list[pb2.Answer]:
        """The next tier's answers to `tensors` (encoded: shared.wire.codec.encode_tensors)."""
        request = pb2.ContinueRequest(tensors=tensors, request_ids=request_ids, thresholds=thresholds)
        try:
            response = await self._calls.call(request, timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise NextTierError(f"next tier at {self.address} answered {code.name}: {exc.details()}",
                                code.name if code in _PASSED_ON else "INTERNAL", next_status=code.name) from exc
        answers = list(response.answers)
        if [a.request_id for a in answers] != list(request_ids):
            raise NextTierError(f"next tier at {self.address} answered other request ids than sent")
        return answers

    async def close(self) -> None:
        self._calls.close()
        await self._channel.close()
