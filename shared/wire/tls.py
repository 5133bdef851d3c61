"""TLS and mutual TLS for the tiers and their clients, configured by PEM file paths.

Server side (every tier): a certificate and key make the port TLS; a client CA on top makes it
mutual TLS (clients must present a certificate that CA signed, else the handshake fails and the
call is UNAVAILABLE). Client side (TierClient, the tier-to-tier ContinuationClient): a CA to
verify the server, optionally a certificate and key for mutual TLS. No paths: plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.errors import TierServeError


class TLSConfigError(TierServeError):
    code = "FAILED_PRECONDITION"


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: {exc.strerror}") from exc


def server_credentials(cert: str | Path, key: str | Path,
                       client_ca: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials for a server port; with client_ca, clients must present a certificate."""
    return grpc.ssl_server_credentials(
        [(_read(key, "key"), _read(cert, "certificate"))],
        root_certificates=_read(client_ca, "client CA") if client_ca else None,
        require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the server (ca; None: the system's roots) and proves itself (cert+key)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name to expect in the server's certificate, if not the host

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("a client certificate needs its key and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca else None,
            private_key=_read(self.key, "key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def secure_or_insecure_channel(address: str, options: list[tuple[str, Any]],
                               tls: ClientTLS | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(address: str, options: list[tuple[str, Any]], tls: ClientTLS | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])
