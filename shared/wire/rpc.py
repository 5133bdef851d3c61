"""The project's gRPC messages and services (proto/tierserve.proto) and the channel and server options.

The stubs are generated at install time (`python -m shared.wire.stubs`); a checkout whose protos
are newer than its stubs regenerates them here, before they are imported.
"""

from __future__ import annotations

from shared.wire.stubs import generate, stale

if stale():
    generate()

from shared.wire.gen import tierserve_pb2 as pb2  # noqa: E402
from shared.wire.gen import tierserve_pb2_grpc as pb2_grpc  # noqa: E402

__all__ = ["pb2", "pb2_grpc"]

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 5_000


def message_size_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options limiting messages both ways (the servers' guard against oversize requests)."""
    return [("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes)]


def server_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, reuse_port: bool = False,
                   max_connection_age_s: float = 0.0, max_connection_age_grace_s: float = 5.0
                   ) -> list[tuple[str, int]]:
    """gRPC options of the tiers' servers.

    reuse_port False: a second process on the same port fails to start instead of silently taking
    half the traffic. max_connection_age_s (0: unlimited): connections are closed gracefully after
    this long (in-flight calls get the grace period), so clients re-resolve and spread their calls
    onto replicas started since. Keepalive pings from clients are allowed (KEEPALIVE_TIME_MS).
    """
    options = [*message_size_options(max_bytes), ("grpc.so_reuseport", int(reuse_port)),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
               ("grpc.http2.max_ping_strikes", 0)]
    if max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000))]
    return options


def channel_options(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options of tierserve's client channels (tier to tier, TierClient, AsyncTierClient):
    message size limits, and keepalive pings so that a peer that vanished without closing its
    connection (a partition, a frozen host) is noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS."""
    return [*message_size_options(max_bytes), ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]
