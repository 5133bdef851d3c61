"""Clients of tierserve's entry tier: TierClient (blocking) and AsyncTierClient (asyncio), and a
health probe. Plain unary Classify calls: the timeout is the call's gRPC deadline, which the
tiers pass on downstream; cancelling a call cancels the work behind it. The address may name
several replicas of the entry tier (shared.wire.targets): calls are balanced round_robin over
those reporting SERVING.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.wire.codec import to_tensor
from shared.wire.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb2, pb2_grpc
from shared.wire.targets import grpc_target, target_options
from shared.wire.tls import ClientTLS, aio_channel, secure_or_insecure_channel

DEFAULT_TIMEOUT = 30.0
CLASSIFIER_SERVICE = pb2.DESCRIPTOR.services_by_name["Classifier"].full_name

__all__ = ["DEFAULT_TIMEOUT", "AsyncTierClient", "TierClient", "health_status", "not_an_entry_tier"]


def _classify_request(texts: Sequence[str], thresholds: Mapping[str, float] | None,
                      request_id: str) -> pb2.ClassifyRequest:
    return pb2.ClassifyRequest(texts=list(texts), thresholds=dict(thresholds or {}),
                               request_id=request_id)


def _pairs_request(pairs: Sequence[tuple[str, str]], thresholds: Mapping[str, float] | None,
                   request_id: str) -> pb2.ClassifyRequest:
    return pb2.ClassifyRequest(pairs=[pb2.TextPair(first=first, second=second) for first, second in pairs],
                               thresholds=dict(thresholds or {}), request_id=request_id)


def _images_request(images: np.ndarray, thresholds: Mapping[str, float] | None,
                    request_id: str) -> pb2.ClassifyRequest:
    return pb2.ClassifyRequest(images=to_tensor(np.asarray(images)), thresholds=dict(thresholds or {}),
                               request_id=request_id)


def _label_report(labels: Mapping[str, str]) -> pb2.LabelReport:
    return pb2.LabelReport(labels=[pb2.SampleLabel(sample_id=i, label=label) for i, label in labels.items()])


def _options(max_message_bytes: int) -> list[tuple[str, object]]:
    return [*channel_options(max_message_bytes), *target_options(CLASSIFIER_SERVICE)]


def not_an_entry_tier(error: grpc.RpcError, address: str, tls: ClientTLS | None = None) -> str | None:
    """What to tell a user whose Classify call reached a tier that does not serve it, else None.

    The client's health checks ask for the Classifier service: a tier without it is "unhealthy"
    to this client (UNAVAILABLE) and would answer a call UNIMPLEMENTED."""
    if not isinstance(error, grpc.Call):
        return None
    code = error.code()
    unhealthy = code == grpc.StatusCode.UNAVAILABLE and "unhealthy" in (error.details() or "")
    if code != grpc.StatusCode.UNIMPLEMENTED and not (
            unhealthy and health_status(address, service=CLASSIFIER_SERVICE, tls=tls) == "NOT_FOUND"):
        return None
    return (f"{address} does not serve {CLASSIFIER_SERVICE}: it is not an entry tier (an edge or cloud "
            "tier serves only Continue); point the client at the mobile tier")


class TierClient:
    """Blocking client of the entry tier, safe to share between threads. Raises grpc.RpcError on failure."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = secure_or_insecure_channel(grpc_target(address), _options(max_message_bytes), tls)
        stub = pb2_grpc.ClassifierStub(self._channel)
        self._classify, self._report = stub.Classify, stub.ReportLabels

    def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                 timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per text, in order. thresholds: per-request overrides by tier name."""
        request = _classify_request(texts, thresholds, request_id)
        return list(self._classify(request, timeout=self.timeout if timeout is None else timeout).answers)

    def classify_pairs(self, pairs: Sequence[tuple[str, str]], thresholds: Mapping[str, float] | None = None,
                       timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per (first, second) sentence pair of a pair model (paraphrase, entailment), in order."""
        request = _pairs_request(pairs, thresholds, request_id)
        return list(self._classify(request, timeout=self.timeout if timeout is None else timeout).answers)

    def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float] | None = None,
                        timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per image of an image model: uint8 or float32 (0..255), [N, C, H, W] or [N, H, W]."""
        request = _images_request(images, thresholds, request_id)
        return list(self._classify(request, timeout=self.timeout if timeout is None else timeout).answers)

    def report_labels(self, labels: Mapping[str, str], timeout: float | None = None) -> int:
        """Report true labels of answered samples, sample id (an answer's request_id) -> label name,
        for each exit's live accuracy; the number accepted. Unknown or forgotten ids: NOT_FOUND."""
        report = _label_report(labels)
        return int(self._report(report, timeout=self.timeout if timeout is None else timeout).accepted)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTierClient:
    """asyncio client of the entry tier (create it inside a running event loop)."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = aio_channel(grpc_target(address), _options(max_message_bytes), tls)
        stub = pb2_grpc.ClassifierStub(self._channel)
        self._classify, self._report = stub.Classify, stub.ReportLabels

    async def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                       timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _classify_request(texts, thresholds, request_id)
        return list((await self._classify(request, timeout=self.timeout if timeout is None else timeout)).answers)

    async def classify_pairs(self, pairs: Sequence[tuple[str, str]], thresholds: Mapping[str, float] | None = None,
                             timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _pairs_request(pairs, thresholds, request_id)
        return list((await self._classify(request, timeout=self.timeout if timeout is None else timeout)).answers)

    async def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float] | None = None,
                              timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _images_request(images, thresholds, request_id)
        return list((await self._classify(request, timeout=self.timeout if timeout is None else timeout)).answers)

    async def report_labels(self, labels: Mapping[str, str], timeout: float | None = None) -> int:
        report = _label_report(labels)
        return int((await self._report(report, timeout=self.timeout if timeout is None else timeout)).accepted)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def health_status(address: str, timeout: float = 1.0, service: str = "",
                  tls: ClientTLS | None = None) -> str:
    """The standard health check's status name (SERVING, NOT_SERVING, ...), NOT_FOUND for a service
    the server does not know, UNREACHABLE on any other error."""
    with secure_or_insecure_channel(grpc_target(address), [], tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return "NOT_FOUND" if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND \
                else "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
