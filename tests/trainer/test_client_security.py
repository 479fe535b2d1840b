"""TLS, mutual TLS and bearer tokens from the client's side, against a real server.

A CA made here signs a server certificate for the name "teacher.internal" only, so the
client must verify it through `TlsOptions.server_name` while dialling 127.0.0.1.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.pki import Pki, make_pki
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), server_name=SERVER_NAME)


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def secure_server(model_dir: Path, pki: Pki, token: str) -> Iterator[object]:  # noqa: F811
    """TLS with required client certificates and a bearer token."""
    srv = thread_server(
        model_dir, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert,
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
    tls = TlsOptions(pki.ca_cert, pki.client_cert, pki.client_key, server_name=SERVER_NAME)
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
    tls = TlsOptions(pki.ca_cert, pki.client_cert, pki.client_key, server_name=SERVER_NAME)
    with (
        TeacherClient(_config(secure_server, tls=tls, token=sent)) as client,
        pytest.raises(TeacherRequestError, match="UNAUTHENTICATED") as error,
    ):
        client.connect()
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_on_first_score_is_not_retried(
    secure_server: object, pki: Pki, gen: torch.Generator
) -> None:
    tls = TlsOptions(pki.ca_cert, pki.client_cert, pki.client_key, server_name=SERVER_NAME)
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
        "client_cert": TlsOptions(pki.ca_cert, server_name=SERVER_NAME),
        "server_name": TlsOptions(pki.ca_cert, pki.client_cert, pki.client_key),
        "tls": None,
    }[missing]
    config = _config(secure_server, tls=tls, token=token, deadline_s=5.0)
    with TeacherClient(config) as client, pytest.raises(TeacherUnavailableError):
        client.connect()
