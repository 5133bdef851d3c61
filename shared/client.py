"""Clients of the tierserve API: TierClient (sync) and AsyncTierClient for Classify at the entry
tier, ContinuationClient for the tier-to-tier Continue call, and a health probe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.codec import encode_tensors
from shared.errors import TierServeError
from shared.rpc import DEFAULT_MAX_MESSAGE_BYTES, message_size_options, pb2, pb2_grpc

DEFAULT_TIMEOUT = 30.0
# Statuses of the next tier passed on as they are; any other failure there is this tier's fault.
_PASSED_ON = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


class NextTierError(TierServeError):
    """The call to the next tier failed; `code` is the status this tier answers with."""

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code


def _classify_request(texts: Sequence[str], thresholds: Mapping[str, float] | None,
                      request_id: str) -> pb2.ClassifyRequest:
    return pb2.ClassifyRequest(texts=list(texts), thresholds=dict(thresholds or {}),
                               request_id=request_id)


class TierClient:
    """Blocking client of the entry tier. Raises grpc.RpcError on failure."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address, options=message_size_options(max_message_bytes))
        self._stub = pb2_grpc.ClassifierStub(self._channel)

    def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                 timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per text, in order. thresholds: per-request overrides by tier name."""
        request = _classify_request(texts, thresholds, request_id)
        return list(self._stub.Classify(request, timeout=timeout or self.timeout).answers)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTierClient:
    """asyncio client of the entry tier (create it inside a running event loop)."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(
            address, options=message_size_options(max_message_bytes))
        self._stub = pb2_grpc.ClassifierStub(self._channel)

    async def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                       timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _classify_request(texts, thresholds, request_id)
        response = await self._stub.Classify(request, timeout=timeout or self.timeout)
        return list(response.answers)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ContinuationClient:
    """The call from one tier to the next (asyncio). Failures raise NextTierError."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(
            address, options=message_size_options(max_message_bytes))
        self._stub = pb2_grpc.ContinuationStub(self._channel)

    async def continue_batch(self, tensors: Mapping[str, np.ndarray], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None
                             ) -> list[pb2.Answer]:
        request = pb2.ContinueRequest(
            tensors=encode_tensors(tensors), request_ids=list(request_ids),
            thresholds=dict(thresholds))
        try:
            response = await self._stub.Continue(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise NextTierError(
                f"next tier at {self.address} answered {code.name}: {exc.details()}",
                code.name if code in _PASSED_ON else "INTERNAL") from exc
        answers = list(response.answers)
        if [a.request_id for a in answers] != list(request_ids):
            raise NextTierError(f"next tier at {self.address} answered other request ids than sent")
        return answers

    async def close(self) -> None:
        await self._channel.close()


def health_status(address: str, timeout: float = 1.0, service: str = "") -> str:
    """The standard health check's status name (SERVING, NOT_SERVING, ...); UNREACHABLE on error."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
