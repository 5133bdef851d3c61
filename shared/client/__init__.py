"""Clients of the tierserve API: TierClient (sync) and AsyncTierClient for the entry tier
(ClassifyStream, or Classify), ContinuationClient from tier to tier (ContinueStream, or Continue),
and a health probe. The streams of calls themselves live in shared.streaming."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.serving.streaming import AsyncCalls, SyncCalls
from shared.wire.codec import to_tensor
from shared.wire.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb2, pb2_grpc
from shared.wire.tls import ClientTLS, aio_channel, secure_or_insecure_channel

DEFAULT_TIMEOUT = 30.0


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
    (shared.serving.streaming; Classify for an entry tier without it), "unary" one Classify call each.
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
