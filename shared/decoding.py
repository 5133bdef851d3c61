"""Requests whose bytes do not parse (invalid UTF-8 in a string field, garbage) -> INVALID_ARGUMENT.

gRPC parses a request before any servicer code runs and answers a parse failure with a bare
INTERNAL "Exception deserializing request!". This server interceptor parses leniently instead
and hands the failure to shared.tier.answer_rpc, the one place errors become statuses, so the
caller gets INVALID_ARGUMENT with a message saying what was wrong. Unknown fields parse fine and
are ignored (proto3's forward compatibility), so newer clients keep working.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from shared.errors import InvalidInput
from shared.metrics import TierMetrics
from shared.tier import answer_rpc


class Undecodable:
    """What the lenient parser hands the servicer when the request's bytes do not parse."""

    def __init__(self, message_type: str, size: int, error: Exception) -> None:
        self.message_type = message_type
        self.size = size
        self.error = error

    def explain(self) -> str:
        return (f"the request ({self.size} bytes) is not a valid {self.message_type}: {self.error} "
                "(e.g. a string field holding invalid UTF-8)")


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = descriptor.full_name if descriptor is not None else "message"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom parser raises
            return Undecodable(message_type, len(data), exc)

    return parse


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary method of the server (ours, and any added beside them)."""

    def __init__(self, metrics: TierMetrics, tier: str) -> None:
        self.metrics = metrics
        self.tier = tier
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
        behavior = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not isinstance(request, Undecodable):
                return await behavior(request, context)

            async def reject() -> Any:
                raise InvalidInput(request.explain())

            return await answer_rpc(context, self.metrics, self.tier, reject)

        wrapped = grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped
