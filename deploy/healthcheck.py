"""Container healthcheck: exit 0 when a tier answers standard gRPC health checking with SERVING.

Usage: python healthcheck.py [HOST:PORT] [SERVICE]. Without an address: $TIERSERVE_HEALTH_ADDRESS,
else the port of the tier the container runs (PID 1's `python -m <tier>_node` or `tierserve serve <tier>`:
its `--listen ADDR`, then $TIERSERVE_<TIER>_LISTEN, then the tier's default port), on 127.0.0.1.
A tier serving TLS: $TIERSERVE_HEALTH_TLS_CA (the CA of its certificate), and for mutual TLS
$TIERSERVE_HEALTH_TLS_CERT and $TIERSERVE_HEALTH_TLS_KEY (a client certificate it accepts);
$TIERSERVE_HEALTH_TLS_SERVER_NAME when the certificate does not name the address's host.
Needs only grpcio and grpcio-health-checking (both in the serving image).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORTS = {"mobile": 50051, "edge": 50052, "cloud": 50053}


def container_command() -> list[str]:
    try:
        return Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def default_address(env: Mapping[str, str], command: Sequence[str] = ()) -> str:
    if env.get("TIERSERVE_HEALTH_ADDRESS"):
        return env["TIERSERVE_HEALTH_ADDRESS"]
    # `python -m <tier>_node`, or `tierserve serve <tier>`
    tiers = [t for t in DEFAULT_PORTS if f"{t}_node" in command or any(
        command[i] == "serve" and command[i + 1] == t for i in range(len(command) - 1))]
    tiers += [t for t in DEFAULT_PORTS if env.get(f"TIERSERVE_{t.upper()}_LISTEN")]
    tier = tiers[0] if tiers else "mobile"
    listen = env.get(f"TIERSERVE_{tier.upper()}_LISTEN", f":{DEFAULT_PORTS[tier]}")
    for i, arg in enumerate(command):
        if arg == "--listen" and i + 1 < len(command):
            listen = command[i + 1]
        elif arg.startswith("--listen="):
            listen = arg.split("=", 1)[1]
    return "127.0.0.1:" + listen.rsplit(":", 1)[-1]


def channel_for(address: str, env: Mapping[str, str]) -> grpc.Channel:
    if not env.get("TIERSERVE_HEALTH_TLS_CA"):
        return grpc.insecure_channel(address)

    def read(name: str) -> bytes | None:
        return Path(env[name]).read_bytes() if env.get(name) else None

    credentials = grpc.ssl_channel_credentials(read("TIERSERVE_HEALTH_TLS_CA"), read("TIERSERVE_HEALTH_TLS_KEY"),
                                               read("TIERSERVE_HEALTH_TLS_CERT"))
    options = []
    if env.get("TIERSERVE_HEALTH_TLS_SERVER_NAME"):
        options.append(("grpc.ssl_target_name_override", env["TIERSERVE_HEALTH_TLS_SERVER_NAME"]))
    return grpc.secure_channel(address, credentials, options)


def check(address: str, service: str = "", timeout: float = 3.0, env: Mapping[str, str] | None = None) -> bool:
    with channel_for(address, os.environ if env is None else env) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            print(f"{address}: {err.code().name} {err.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: Sequence[str]) -> int:
    address = argv[0] if argv else default_address(os.environ, container_command())
    service = argv[1] if len(argv) > 1 else ""
    return 0 if check(address, service) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
