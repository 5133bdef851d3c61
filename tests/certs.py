"""Throwaway X.509 certificates for TLS tests, generated at test time (never committed).

`make_pki(folder)` writes a CA, a server certificate for 127.0.0.1/localhost, a client
certificate signed by the CA, and a second, untrusted CA with its own client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the trusted CA's certificate
    server: KeyPair  # for 127.0.0.1 and localhost, signed by the CA
    client: KeyPair  # signed by the CA
    rogue_ca: Path  # another CA, trusted by nobody
    rogue_client: KeyPair  # signed by the rogue CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
           ca: bool = False, server: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> KeyPair:
    pair = KeyPair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pair.key.chmod(0o600)
    return pair


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _issue("tierserve test CA", None, ca=True)
    rogue_cert, rogue_key = _issue("rogue CA", None, ca=True)
    ca = _write(folder, "ca", ca_cert, ca_key)
    rogue = _write(folder, "rogue-ca", rogue_cert, rogue_key)
    return PKI(
        ca=ca.cert,
        server=_write(folder, "server", *_issue("tier", (ca_cert.subject, ca_key), server=True)),
        client=_write(folder, "client", *_issue("client", (ca_cert.subject, ca_key))),
        rogue_ca=rogue.cert,
        rogue_client=_write(folder, "rogue-client", *_issue("rogue client", (rogue_cert.subject, rogue_key))),
    )
