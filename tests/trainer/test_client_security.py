"""TLS, mutual TLS and bearer tokens from the client's side, against a real server.

A CA made here signs a server certificate for the name "teacher.internal" only, so the
client must verify it through `TlsOptions.server_name` while dialling 127.0.0.1.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.trainer.client_fixtures import (  # noqa: F401
    VOCAB,
    model_dir,
    random_specs,
    thread_server,
)
from trainer.client import (
    ClientConfig,
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailableError,
    TlsOptions,
)

SERVER_NAME = "teacher.internal"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


Signed = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _write_pair(
    directory: Path,
    stem: str,
    subject: str,
    ca: Signed | None,
    *,
    is_ca: bool = False,
    dns: str | None = None,
) -> Signed:
    """Writes STEM.crt / STEM.key signed by `ca` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = ca if ca else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _write_pair(d, "ca", "test-ca", None, is_ca=True)
    _write_pair(d, "server", SERVER_NAME, ca, dns=SERVER_NAME)
    _write_pair(d, "client", "trainer", ca)
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def secure_server(model_dir: Path, pki: Pki, token: str) -> Iterator[object]:  # noqa: F811
    """TLS with required client certificates and a bearer token."""
    srv = thread_server(
        model_dir, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
        auth_token=token,
    )  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def _config(srv: object, **overrides: object) -> ClientConfig:
    fields: dict[str, object] = {"endpoints": (srv.address,), "max_retries": 0}
    fields.update(overrides)
    return ClientConfig(**fields)  # type: ignore[arg-type]


def test_mutual_tls_and_token_score(
    secure_server: object, pki: Pki, token: str, gen: torch.Generator
) -> None:
    tls = TlsOptions(pki.ca, pki.client_cert, pki.client_key, server_name=SERVER_NAME)
    with TeacherClient(_config(secure_server, tls=tls, token=token)) as client:
        info = client.connect(vocab_size=VOCAB)
        specs = random_specs(gen, 5, max_len=24)
        results = client.score_batch(specs)
    assert info.vocab_size == VOCAB
    assert [r.request_id for r in results] == [s.request_id for s in specs]


@pytest.mark.parametrize("sent", [None, "wrong"])
def test_missing_or_wrong_token_is_refused_at_connect(
    secure_server: object, pki: Pki, sent: str | None
) -> None:
    tls = TlsOptions(pki.ca, pki.client_cert, pki.client_key, server_name=SERVER_NAME)
    with (
        TeacherClient(_config(secure_server, tls=tls, token=sent)) as client,
        pytest.raises(TeacherRequestError, match="UNAUTHENTICATED") as error,
    ):
        client.connect()
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_on_first_score_is_not_retried(
    secure_server: object, pki: Pki, gen: torch.Generator
) -> None:
    tls = TlsOptions(pki.ca, pki.client_cert, pki.client_key, server_name=SERVER_NAME)
    config = _config(secure_server, tls=tls, token="wrong", max_retries=5)
    with (
        TeacherClient(config) as client,
        pytest.raises(TeacherRequestError, match="UNAUTHENTICATED"),
    ):
        client.submit(random_specs(gen, 1)[0]).result(timeout=30)


@pytest.mark.parametrize("missing", ["client_cert", "server_name", "tls"])
def test_tls_without_the_right_credentials_fails(
    secure_server: object, pki: Pki, token: str, missing: str
) -> None:
    tls: TlsOptions | None = {
        "client_cert": TlsOptions(pki.ca, server_name=SERVER_NAME),
        "server_name": TlsOptions(pki.ca, pki.client_cert, pki.client_key),
        "tls": None,
    }[missing]
    config = _config(secure_server, tls=tls, token=token, deadline_s=5.0)
    with TeacherClient(config) as client, pytest.raises(TeacherUnavailableError):
        client.connect()
