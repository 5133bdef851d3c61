"""The one place where a tier's failures become gRPC statuses: a server interceptor around every
unary method the tier serves (Classify, Continue, the Open Inference Protocol, health).

- A request whose bytes do not parse (invalid UTF-8 in a string field, garbage) is INVALID_ARGUMENT
  with a message saying what was wrong, instead of gRPC's bare INTERNAL "Exception deserializing
  request!". Unknown fields parse fine and are ignored (proto3), so newer clients keep working.
- A TierServeError ends the call with its status (shared.errors); anything unexpected is INTERNAL,
  logged, and the server keeps serving.
- A call cancelled by its caller, or past its deadline, stops where it is (the task is cancelled;
  an outgoing call to the next tier is cancelled with it).
- For the methods that do a tier's work, the duration by outcome and errors by status are recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

from shared.errors import InvalidInput, TierServeError, Undecodable
from shared.serving.audit import is_audit
from shared.serving.metrics import OK_OUTCOME, TierMetrics

log = logging.getLogger("tierserve.status")


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that hands back Undecodable instead of raising."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = descriptor.full_name if descriptor is not None else "message"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom parser raises
            return Undecodable(message_type, len(data), exc)

    return parse


MAX_DETAILS_CHARS = 2000  # gRPC turns status details past its metadata limit into RESOURCE_EXHAUSTED


def _bounded(details: str) -> str:
    """A status message kept under gRPC's metadata limits (messages may quote what a client sent)."""
    return details if len(details) <= MAX_DETAILS_CHARS else details[:MAX_DETAILS_CHARS] + "..."


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary method; `counted` names the methods whose calls are the tier's work
    (e.g. Classify, not ReportLabels or health checks): their durations and failures are recorded."""

    def __init__(self, metrics: TierMetrics, tier: str, counted: Collection[str]) -> None:
        self.metrics = metrics
        self.tier = tier
        self.counted = frozenset(counted)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(handler.unary_unary, method.rsplit("/", 1)[-1] in self.counted, method.endswith("/Continue")),
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped

    def _guard(self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
               counted: bool, continue_call: bool) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                if isinstance(request, Undecodable):
                    raise InvalidInput(request.explain())
                return await behavior(request, context)
            except TierServeError as exc:
                code = exc.code
                await context.abort(grpc.StatusCode[exc.code], _bounded(str(exc)))
            except asyncio.CancelledError:
                left = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = context.code().name if context.code() is not None else "UNKNOWN"
                raise
            except Exception as exc:
                log.exception("unexpected failure at the %s tier", self.tier)
                code = "INTERNAL"
                await context.abort(grpc.StatusCode.INTERNAL,
                                    _bounded(f"internal error at the {self.tier} tier: {type(exc).__name__}: {exc}"))
            finally:
                if counted and not (continue_call and is_audit(context.invocation_metadata())):  # not traffic
                    self._record(code, time.perf_counter() - started)

        return guarded

    def _record(self, code: str, seconds: float) -> None:
        metrics = self.metrics
        metrics.record_call(OK_OUTCOME if code == "OK" else code.lower(), seconds)
        if code != "OK":
            metrics.errors.labels(self.tier, code).inc()
