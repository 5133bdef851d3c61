"""Addresses: where a tier listens, and the gRPC target of a tier's replicas, balanced per call.

A target is one address (`host:port`), a list of replica addresses (`10.0.0.1:50052,10.0.0.2:50052`:
IP literals, since gRPC has no resolver for a list of names), a DNS name that resolves to every
replica (`edge.svc:50052`, re-resolved when a replica goes away), or a gRPC target URI as is
(`dns:///...`, `ipv4:...`, `ipv6:...`, `unix:...`). Channels to a target balance calls round_robin
over the replicas whose standard health check reports SERVING (target_options).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
ADDRESS_EXAMPLE = "HOST:PORT, e.g. 127.0.0.1:50051, [::1]:50051 or edge.example:50052"


class AddressError(ValueError):
    """An address or target that does not parse; the message says what was expected."""


def split_host_port(address: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """('host', port) of `host:port` or `[v6 address]:port`; AddressError naming the problem."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise AddressError(f"'{address}' has no host: expected {ADDRESS_EXAMPLE}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise AddressError(f"'{address}': an IPv6 host goes in brackets, e.g. [::1]:50051")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"'{address}' has port '{port_text}': expected a number, {ADDRESS_EXAMPLE}") from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise AddressError(f"'{address}' has port {port}: expected 1..65535")
    return host, port


def check_listen(address: str) -> str:
    """A server's `host:port` (port 0: any free port), checked."""
    split_host_port(address, allow_port_zero=True)
    return address.strip()


def _ip_family(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def grpc_target(target: str) -> str:
    """The gRPC target URI of a tier's address, list of replica addresses, DNS name or URI."""
    text = target.strip()
    if text.startswith(URI_SCHEMES):
        if not text.split(":", 1)[1].strip("/"):
            raise AddressError(f"'{target}' names no address after its scheme")
        return text
    replicas = [part.strip() for part in text.split(",")]
    if len(replicas) == 1:
        split_host_port(text)
        return f"dns:///{text}"
    families = set()
    for replica in replicas:
        host, _ = split_host_port(replica)
        family = _ip_family(host)
        if family is None:
            raise AddressError(
                f"'{target}': a list of replicas takes IP addresses ('{host}' is a name); for names, "
                "use one DNS name that resolves to every replica")
        families.add(family)
    if len(families) > 1:
        raise AddressError(f"'{target}': a list of replicas is all IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(replicas)}"


def target_options(health_service: str, reresolve_ms: int = 500) -> list[tuple[str, Any]]:
    """Channel options to balance calls over a target's ready replicas.

    round_robin with client-side health checking of `health_service`: a replica that reports
    NOT_SERVING (loading, draining) gets no calls. gRPC re-resolves a DNS name at most every
    30 s by default; a replica restarted at a new address would get no calls that long, so the
    floor is `reresolve_ms`. Service configs in DNS TXT records are not read: this one applies.
    """
    config = {"loadBalancingConfig": [{"round_robin": {}}],
              "healthCheckConfig": {"serviceName": health_service}}
    return [("grpc.service_config", json.dumps(config)),
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.dns_min_time_between_resolutions_ms", reresolve_ms)]
