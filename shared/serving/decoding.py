"""Requests whose bytes do not parse (invalid UTF-8 in a string field, garbage) -> INVALID_ARGUMENT.

gRPC parses a request before any servicer code runs and answers a parse failure with a bare
INTERNAL "Exception deserializing request!". This server interceptor parses leniently instead
and hands the failure to shared.serving.tier.answer_rpc, the one place errors become statuses, so the
caller gets INVALID_ARGUMENT with a message saying what was wrong. Unknown fields parse fine and
are ignored (proto3's forward compatibility), so newer clients keep working.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from shared.errors import InvalidInput, Undecodable
from shared.serving.metrics import TierMetrics
from shared.serving.tier import answer_rpc


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


# Streaming methods whose servicer takes an Undecodable message in its stream and answers for it
STREAMS_TAKING_UNDECODABLE = frozenset({"/tierserve.v1.Continuation/ContinueStream",
                                        "/tierserve.v1.Classifier/ClassifyStream"})


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary method of the server (ours, and any added beside them), and the
    streaming methods of STREAMS_TAKING_UNDECODABLE."""

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
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.stream_stream is not None and method in STREAMS_TAKING_UNDECODABLE:
            wrapped = grpc.stream_stream_rpc_method_handler(
                handler.stream_stream, request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
            self._wrapped[method] = wrapped
            return wrapped
        if handler.unary_unary is None:
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
