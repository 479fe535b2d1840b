"""Credential rotation under a running server: TLS certificate, key, client CA, token.

The server starts with one PKI and one token file; both are then replaced on disk the
way a Secret volume update does it (new files renamed into place). Without a restart,
a new client must see the new server certificate, the new client CA must be enforced,
the old token must be refused and the new one accepted.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import grpc
import pytest
import torch

from teacher_service.security import TokenFile
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from tests.pki import Issued, Pki, make_pki
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import make_request

CHECK_S = 0.2  # the server's credentials check interval in this test


def _replace(path: Path, data: bytes) -> None:
    """Writes a sibling file and renames it over `path` (atomic, new inode)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pki(directory: Path) -> Pki:
    directory.mkdir()
    return make_pki(directory)


def _install(pki: Pki, live: Path, token: str) -> None:
    _replace(live / "server.crt", pki.server.cert_pem)
    _replace(live / "server.key", pki.server.key_pem)
    _replace(live / "ca.crt", pki.ca.cert_pem)
    _replace(live / "token", f"{token}\n".encode())


def _score(port: int, trust: Pki, client: Issued, token: str) -> grpc.StatusCode:
    """One Score on a fresh channel; OK or the failing status code."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=trust.ca.cert_pem,
        private_key=client.key_pem,
        certificate_chain=client.cert_pem,
    )
    request = make_request(torch.randint(0, TINY_VOCAB, (12,)), 5, 3)
    # A fresh channel each time: a new TLS handshake, as a newly started trainer makes.
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        try:
            response = stub.Score(
                request, metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
        except grpc.RpcError as err:
            return err.code()
    assert list(response.topk_ids.shape) == [7, 3]
    return grpc.StatusCode.OK


def _eventually_ok(port: int, trust: Pki, client: Issued, token: str) -> None:
    """Rotation takes effect within a few check intervals (event: the first success)."""
    deadline = time.monotonic() + 30
    code = None
    while time.monotonic() < deadline:
        code = _score(port, trust, client, token)
        if code == grpc.StatusCode.OK:
            return
        time.sleep(CHECK_S)
    raise AssertionError(f"rotated credentials never accepted; last status {code}")


def test_tls_files_and_token_rotate_without_restart(tmp_path: Path, tiny_model_dir: Path) -> None:
    old, new = _pki(tmp_path / "old_pki"), _pki(tmp_path / "new_pki")
    live = tmp_path / "live"
    live.mkdir()
    old_token, new_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    _install(old, live, old_token)
    server = start_thread_server(
        ("tiny", tiny_model_dir),
        tls_cert=live / "server.crt",
        tls_key=live / "server.key",
        tls_client_ca=live / "ca.crt",
        auth_token_file=live / "token",
        credentials_check_s=CHECK_S,
    )
    port = server.grpc_port
    try:
        assert _score(port, old, old.client, old_token) == grpc.StatusCode.OK
        assert _score(port, old, old.client, new_token) == grpc.StatusCode.UNAUTHENTICATED

        _install(new, live, new_token)
        _eventually_ok(port, new, new.client, new_token)
        # The old token is refused now, the new server certificate is what clients see
        # (a client trusting only the old CA cannot connect), and the new client CA is
        # enforced (the old client certificate is refused).
        assert _score(port, new, new.client, old_token) == grpc.StatusCode.UNAUTHENTICATED
        assert _score(port, old, new.client, new_token) == grpc.StatusCode.UNAVAILABLE
        assert _score(port, new, old.client, new_token) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_a_half_written_rotation_keeps_the_previous_material(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A key that does not match the certificate, or an empty token file, is not used:
    clients keep working with what was there before."""
    pki, other = _pki(tmp_path / "a"), _pki(tmp_path / "b")
    live = tmp_path / "live"
    live.mkdir()
    token = secrets.token_urlsafe(16)
    _install(pki, live, token)
    server = start_thread_server(
        ("tiny", tiny_model_dir),
        tls_cert=live / "server.crt",
        tls_key=live / "server.key",
        tls_client_ca=live / "ca.crt",
        auth_token_file=live / "token",
        credentials_check_s=CHECK_S,
    )
    try:
        _replace(live / "server.key", other.server.key_pem)  # mismatched pair
        _replace(live / "token", b"\n")
        time.sleep(3 * CHECK_S)
        for _ in range(3):
            assert _score(server.grpc_port, pki, pki.client, token) == grpc.StatusCode.OK
    finally:
        server.stop()


def test_token_file_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    now = [0.0]
    tokens = TokenFile(path, check_interval_s=10.0, clock=lambda: now[0])
    _replace(path, b"second")
    now[0] = 9.0
    assert tokens.current() == b"first"  # not looked at yet
    now[0] = 10.5
    assert tokens.current() == b"second"
    path.write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        TokenFile(path)


def test_flags_keep_the_token_file_and_the_check_interval(tmp_path: Path) -> None:
    from teacher_service.config import parse_args

    path = tmp_path / "token"
    path.write_text("s3cret\n")
    config = parse_args(
        ["--model", "m", "--auth-token-file", str(path), "--credentials-check-seconds", "0.5"],
        env={},
    )
    assert (config.auth_token, config.auth_token_file) == ("s3cret", path)
    assert config.credentials_check_s == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--credentials-check-seconds", "0"], env={})
