"""Clients of the tierserve API: TierClient (sync) and AsyncTierClient for Classify at the entry
tier, ContinuationClient for the tier-to-tier Continue call, and a health probe."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.codec import encode_tensors, to_tensor
from shared.errors import TierServeError
from shared.rpc import DEFAULT_MAX_MESSAGE_BYTES, message_size_options, pb2, pb2_grpc
from shared.tls import ClientTLS, aio_channel, secure_or_insecure_channel

log = logging.getLogger("tierserve.client")
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
    """Blocking client of the entry tier. Raises grpc.RpcError on failure."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = secure_or_insecure_channel(
            address, message_size_options(max_message_bytes), tls)
        self._stub = pb2_grpc.ClassifierStub(self._channel)

    def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                 timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per text, in order. thresholds: per-request overrides by tier name."""
        request = _classify_request(texts, thresholds, request_id)
        return list(self._stub.Classify(request, timeout=timeout or self.timeout).answers)

    def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float] | None = None,
                        timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        """One answer per image of an image model: uint8 or float32 (0..255), [N, C, H, W] or [N, H, W]."""
        request = _images_request(images, thresholds, request_id)
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
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = aio_channel(address, message_size_options(max_message_bytes), tls)
        self._stub = pb2_grpc.ClassifierStub(self._channel)

    async def classify(self, texts: Sequence[str], thresholds: Mapping[str, float] | None = None,
                       timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _classify_request(texts, thresholds, request_id)
        response = await self._stub.Classify(request, timeout=timeout or self.timeout)
        return list(response.answers)

    async def classify_images(self, images: np.ndarray, thresholds: Mapping[str, float] | None = None,
                              timeout: float | None = None, request_id: str = "") -> list[pb2.Answer]:
        request = _images_request(images, thresholds, request_id)
        response = await self._stub.Classify(request, timeout=timeout or self.timeout)
        return list(response.answers)

    async def close(self) -> None:
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


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class _NoStreams(Exception):
    """The next tier does not offer ContinueStream (an older version): use Continue."""


class _OpenStream:
    """One ContinueStream call: a writer task sends queued requests, a reader task hands each
    response to the future of its call_id. Callers never write themselves: cancelling a write
    would cancel the whole stream, and with it every other caller's call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.outbox: asyncio.Queue[pb2.ContinueRequest] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[pb2.ContinueResponse]] = {}
        self.tasks: list[asyncio.Task[None]] = []


class ContinuationClient:
    """The call from one tier to the next (asyncio). Failures raise NextTierError.

    transport "stream" (the default) multiplexes calls on one long-lived ContinueStream, which
    costs a fraction of a new Continue call per hop; it falls back to Continue for a next tier
    that lacks ContinueStream. "unary": one Continue call each.
    """

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: ClientTLS | None = None, max_reconnect_backoff_ms: int = 250,
                 encoding: str = "fp32", transport: str = "stream") -> None:
        if transport not in ("stream", "unary"):
            raise ValueError(f"unknown transport {transport!r}: stream or unary")
        self.address = address
        self.encoding = encoding  # float tensors on the wire (shared.codec.FLOAT_ENCODINGS)
        self.streaming = transport == "stream"
        self._channel = aio_channel(
            address, [*message_size_options(max_message_bytes),
                      *reconnect_options(max_reconnect_backoff_ms)], tls)
        self._stub = pb2_grpc.ContinuationStub(self._channel)
        self._stream: _OpenStream | None = None
        self._call_ids = itertools.count(1)

    async def continue_batch(self, tensors: Mapping[str, np.ndarray], request_ids: Sequence[str],
                             thresholds: Mapping[str, float], timeout: float | None
                             ) -> list[pb2.Answer]:
        request = pb2.ContinueRequest(
            tensors=encode_tensors(tensors, self.encoding), request_ids=list(request_ids),
            thresholds=dict(thresholds))
        deadline = None if timeout is None else time.monotonic() + timeout
        response = None
        if self.streaming:
            try:
                response = await self._over_stream(request, timeout)
            except _NoStreams:
                log.warning("next tier at %s has no ContinueStream (an older version?): using Continue",
                            self.address)
                self.streaming = False
        if response is None:
            request.ClearField("call_id")
            request.ClearField("timeout_seconds")
            response = await self._unary(request, None if deadline is None else deadline - time.monotonic())
        answers = list(response.answers)
        if [a.request_id for a in answers] != list(request_ids):
            raise NextTierError(f"next tier at {self.address} answered other request ids than sent")
        return answers

    def _failed(self, code: grpc.StatusCode, details: str) -> NextTierError:
        return NextTierError(f"next tier at {self.address} answered {code.name}: {details}",
                             code.name if code in _PASSED_ON else "INTERNAL", next_status=code.name)

    async def _unary(self, request: pb2.ContinueRequest, timeout: float | None) -> pb2.ContinueResponse:
        try:
            return await self._stub.Continue(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc.code(), exc.details() or "") from exc

    async def _over_stream(self, request: pb2.ContinueRequest, timeout: float | None) -> pb2.ContinueResponse:
        stream = self._stream or self._open_stream()
        call_id = next(self._call_ids)
        request.call_id = call_id
        if timeout is not None:
            request.timeout_seconds = max(timeout, 1e-6)  # 0 would mean no deadline
        future: asyncio.Future[pb2.ContinueResponse] = asyncio.get_running_loop().create_future()
        stream.pending[call_id] = future
        stream.outbox.put_nowait(request)
        try:
            async with asyncio.timeout(timeout):
                response = await future
        except TimeoutError:
            raise self._failed(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no response within {timeout * 1000:.0f} ms") from None  # type: ignore[operator]
        finally:
            stream.pending.pop(call_id, None)
        if response.status_code:
            raise self._failed(STATUS_BY_NUMBER.get(response.status_code, grpc.StatusCode.UNKNOWN),
                               response.status_message)
        return response

    def _open_stream(self) -> _OpenStream:
        stream = _OpenStream(self._stub.ContinueStream())
        stream.tasks = [asyncio.create_task(self._write(stream)), asyncio.create_task(self._read(stream))]
        self._stream = stream
        return stream

    async def _write(self, stream: _OpenStream) -> None:
        try:
            while True:
                await stream.call.write(await stream.outbox.get())
        except grpc.aio.AioRpcError as exc:
            self._end(stream, self._stream_error(exc))
        except Exception as exc:  # the call ended under the write (InvalidStateError): the reader says why
            log.debug("write on the stream to %s failed: %r", self.address, exc)
            stream.call.cancel()

    async def _read(self, stream: _OpenStream) -> None:
        error: Exception
        try:
            while (response := await stream.call.read()) is not grpc.aio.EOF:
                future = stream.pending.pop(response.call_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
            error = self._failed(grpc.StatusCode.UNAVAILABLE, "it ended the stream (shutting down?)")
        except grpc.aio.AioRpcError as exc:
            error = self._stream_error(exc)
        except asyncio.CancelledError:
            error = self._failed(grpc.StatusCode.CANCELLED, "the client closed")
        self._end(stream, error)

    def _stream_error(self, exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return _NoStreams()
        if exc.code() == grpc.StatusCode.CANCELLED and exc.details() == "Locally cancelled by application!":
            return self._failed(grpc.StatusCode.UNAVAILABLE, "the stream to it broke")
        return self._failed(exc.code(), exc.details() or "")

    def _end(self, stream: _OpenStream, error: Exception) -> None:
        """The stream is over: every call still waiting on it fails with `error`; the next call opens a new one."""
        if self._stream is stream:
            self._stream = None
        for future in stream.pending.values():
            if not future.done():
                future.set_exception(error)
        stream.pending.clear()
        stream.call.cancel()
        for task in stream.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        if self._stream is not None:
            self._end(self._stream, self._failed(grpc.StatusCode.CANCELLED, "the client closed"))
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
