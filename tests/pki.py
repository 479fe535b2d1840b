"""A throwaway X.509 PKI for the TLS tests: EC P-256 keys, certificates valid for a day.

`issue_certificate` makes one certificate (self-signed, or signed by another `Issued`),
`write_pem` puts it on disk as STEM.crt / STEM.key, and `make_pki` builds the usual set:
a CA, a server certificate, a client certificate, and a client certificate from a
second, unrelated CA that a mutual-TLS server must refuse.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and both as PEM bytes (key in PKCS#8)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    key_pem: bytes


def issue_certificate(
    common_name: str,
    *,
    ca: Issued | None = None,
    is_ca: bool = False,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> Issued:
    """A certificate for `common_name`, signed by `ca`, or self-signed when `ca` is None.

    The names go into the subjectAltName extension, which is what TLS clients check.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    # Backdated a little so a clock a few seconds off does not make it "not yet valid".
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject if ca else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca.key if ca else key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem)


def write_pem(issued: Issued, directory: Path, stem: str) -> tuple[Path, Path]:
    """Writes DIRECTORY/STEM.crt and DIRECTORY/STEM.key; returns (cert path, key path)."""
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(issued.cert_pem)
    key_path.write_bytes(issued.key_pem)
    return cert_path, key_path


@dataclass(frozen=True)
class Pki:
    """One CA's server and client certificates (in memory and on disk), and a stranger."""

    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate signed by another CA
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path, server_name: str | None = None) -> Pki:
    """Issues the set and writes ca.crt, server.crt/.key and client.crt/.key into `directory`.

    The server certificate names localhost and 127.0.0.1, or, when `server_name` is given,
    that name only: then a client dialling loopback must verify it through a server-name
    override, and one without the override must fail.
    """
    ca = issue_certificate("test-ca", is_ca=True)
    if server_name is None:
        server = issue_certificate(
            "teacher", ca=ca, dns_names=("localhost",), ip_addresses=("127.0.0.1",)
        )
    else:
        server = issue_certificate(server_name, ca=ca, dns_names=(server_name,))
    client = issue_certificate("trainer", ca=ca)
    stranger = issue_certificate("intruder", ca=issue_certificate("other-ca", is_ca=True))
    ca_cert, _ = write_pem(ca, directory, "ca")
    server_cert, server_key = write_pem(server, directory, "server")
    client_cert, client_key = write_pem(client, directory, "client")
    paths = (ca_cert, server_cert, server_key, client_cert, client_key)
    return Pki(ca, server, client, stranger, *paths)
