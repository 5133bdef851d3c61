"""Clients of the tierserve API: TierClient (sync) and AsyncTierClient for the entry tier
(ClassifyStream, or Classify), ContinuationClient from tier to tier (ContinueStream, or Continue),
and a health probe. The streams of calls themselves live in shared.streaming."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.codec import to_tensor
from shared.errors import TierServeError
from shared.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb2, pb2_grpc
from shared.streaming import AsyncCalls, SyncCalls
from shared.tls import ClientTLS, aio_channel, secure_or_insecure_channel

DEFAULT_TIMEOUT = 30.0
# Statuses of the next tier passed on as they are; any other failure there is this tier's fault.
_PASSED_ON = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


class NextTierError(TierServeError):
    """The call to the next tier failed; `code` is the status this tier answers with.

    next_status: the status the next tier's call ended with (None: not a gRPC failure);
    kind: why, in a word (shared.resilience: unavailable, deadline, overloaded, circuit_open, error).
    """

    def __init__(self, message: str, code: str = "INTERNAL", kind: str = "error",
                 next_status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.next_status = next_status


def _classify_request(texts: Sequence[str], thresholds: Mapping[str, float] | None,
                      request_id: str) -> pb2.ClassifyRequest:
    return pb2.ClassifyRequest(texts=list(texts), thresholds=dict(thresholds or {}),
                               request_id=request_id)


def _images_request(images: np.ndarray, thresholds: Mapping[str, float] | None,
                    request_id: str) -> pb2.ClassifyRequest:
    return pb2.ClassifyRequest(images=to_tensor(np.asarray(images)), thresholds=dict(thresholds or {}),
                               request_id=request_id)


class TierClient:
    """Blocking client of the entry tier, safe to share between threads. Raises grpc.RpcError on failure.

    transport "stream" (the default) sends every call on one long-lived ClassifyStream
    (shared.streaming; Classify for an entry tier without it), "unary" one Classify call each.
    """

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTLS | None = None, transport: str = "stream") -> None:
        self.address = address
        self.timeout = timeout
        self._channel = secure_or_insecure_channel(
            address, channel_options(max_message_bytes), tls)
        stub = pb2_grpc.ClassifierStub(self._channel)
        self._calls = SyncCalls(stub.ClassifyStream, stub.Classify, address, transport)

    def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                 timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per text, in order. thresholds: per-request overrides by tier name."""
        request = _classify_request(texts, thresholds, request_id)
        return list(self._calls.call(request, timeout or self.timeout).answers)

    def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float] | None = None,
                        timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per image of an image model: uint8 or float32 (0..255), [N, C, H, W] or [N, H, W]."""
        request = _images_request(images, thresholds, request_id)
        return list(self._calls.call(request, timeout or self.timeout).answers)

    def close(self) -> None:
        self._calls.close()
        self._channel.close()

    def __enter__(self) -> TierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTierClient:
    """asyncio client of the entry tier (create it inside a running event loop); transport as TierClient's."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTLS | None = None, transport: str = "stream") -> None:
        self.address = address
        self.timeout = timeout
        self._channel = aio_channel(address, channel_options(max_message_bytes), tls)
        stub = pb2_grpc.ClassifierStub(self._channel)
        self._calls = AsyncCalls(stub.ClassifyStream, stub.Classify, address, transport)

    async def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                       timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _classify_request(texts, thresholds, request_id)
        return list((await self._calls.call(request, timeout or self.timeout)).answers)

    async def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float] | None = None,
                              timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _images_request(images, thresholds, request_id)
        return list((await self._calls.call(request, timeout or self.timeout)).answers)

    async def close(self) -> None:
        self._calls.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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
    (shared.streaming; Continue for a next tier without it), "unary" one Continue call each.
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
        """The next tier's answers to `tensors` (encoded: shared.codec.encode_tensors)."""
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


def health_status(address: str, timeout: float = 1.0, service: str = "",
                  tls: ClientTLS | None = None) -> str:
    """The standard health check's status name (SERVING, NOT_SERVING, ...); UNREACHABLE on error."""
    with secure_or_insecure_channel(address, [], tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
