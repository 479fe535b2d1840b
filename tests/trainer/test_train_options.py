"""The trainer's deployment options against a real TLS + token teacher service on loopback.

- the client id: unique per process and rank by default, the override is what the
  server's fair queue and `teacher_service_client_tokens_total{client=...}` see;
- TLS (CA, client certificate for mutual TLS, server-name override) and a token file;
- the token from HYBRID_DISTILL_AUTH_TOKEN through the CLI;
- a missing or wrong token fails at start with an error saying what was sent.

A CA made here signs a server certificate for "teacher.internal" only, so the trainer
must verify it through `server_name` while dialling 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from teacher_service.config import ModelSpec, ServerConfig
from teacher_service.server import ThreadedServer, serve_in_thread
from tests.pki import Pki, make_pki
from tests.trainer.test_train_fixtures import tiny_config, tiny_models
from trainer.config import (
    AUTH_TOKEN_ENV,
    RunConfig,
    TeacherSpec,
    TrainConfig,
    client_id_for,
    parse_args,
)
from trainer.teacher_source import TeacherAuthError
from trainer.train import train

SERVER_NAME = "teacher.internal"
CLIENT_TOKENS = "teacher_service_client_tokens_total"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), server_name=SERVER_NAME)


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(root: Path, pki: Pki, token: str) -> Iterator[ThreadedServer]:
    """Mutual TLS (client certificates required) and a bearer token."""
    teacher, _ = tiny_models(root)
    cfg = ServerConfig(
        models=(ModelSpec("tiny", teacher),), host="127.0.0.1", grpc_port=0, http_port=0,
        torch_threads=1, grace_seconds=0.0, tls_cert=pki.server_cert, tls_key=pki.server_key,
        tls_client_ca=pki.ca_cert, auth_token=token,
    )  # fmt: skip
    srv = serve_in_thread(cfg)
    try:
        yield srv
    finally:
        srv.stop()


def _tls_spec(srv: ThreadedServer, pki: Pki, **auth: str) -> TeacherSpec:
    return TeacherSpec(
        name="svc", endpoints=(srv.address,), ca_cert=str(pki.ca_cert),
        client_cert=str(pki.client_cert), client_key=str(pki.client_key), server_name=SERVER_NAME,
        **auth,
    )  # fmt: skip


def _one_step(root: Path, out: Path, spec: TeacherSpec, client_id: str = "") -> TrainConfig:
    config = tiny_config(root, out, teachers=(spec,))
    run = dataclasses.replace(config.run, steps=1, client_id=client_id)
    return dataclasses.replace(config, run=run)


def _tokens(srv: ThreadedServer, client: str) -> float:
    return srv.metrics.registry.get_sample_value(CLIENT_TOKENS, {"client": client}) or 0.0


def test_default_client_id_is_unique_per_process_and_rank() -> None:
    code = (
        "from trainer.config import RunConfig, client_id_for\n"
        "print(client_id_for(RunConfig(), 0)); print(client_id_for(RunConfig(), 1))"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    ids = [line for out in outs for line in out.stdout.split()]
    ids.append(client_id_for(RunConfig(), 0))
    assert len(set(ids)) == len(ids) == 5, ids
    host = f"pod-{secrets.token_hex(3)}"  # Kubernetes sets HOSTNAME to the pod's host name
    rank = secrets.randbelow(64)
    assert client_id_for(RunConfig(), rank, {"HOSTNAME": host}).startswith(f"{host}-")
    assert client_id_for(RunConfig(), rank, {"HOSTNAME": host}).endswith(f"-rank{rank}")
    custom = RunConfig(client_id=f"exp-{host}-{{rank}}")
    assert client_id_for(custom, rank) == f"exp-{host}-{rank}"


def test_client_id_default_and_override_reach_the_server(
    server: ThreadedServer, root: Path, pki: Pki, token: str, tmp_path: Path
) -> None:
    spec = _tls_spec(server, pki, token=token)
    default = _one_step(root, tmp_path / "a", spec)
    expected = client_id_for(default.run, 0)
    before = _tokens(server, expected)
    train(default)
    assert _tokens(server, expected) > before

    override = f"experiment-{secrets.token_hex(4)}"
    train(_one_step(root, tmp_path / "b", spec, client_id=override + "-r{rank}"))
    assert _tokens(server, f"{override}-r0") > 0
    assert _tokens(server, override + "-r{rank}") == 0  # the placeholder was filled in


def test_tls_and_token_file_train_against_a_secure_service(
    server: ThreadedServer, root: Path, pki: Pki, token: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")  # mounted Secrets often end with a newline
    cid = f"tls-{secrets.token_hex(4)}"
    spec = _tls_spec(server, pki, token_file=str(token_file))
    result = train(_one_step(root, tmp_path / "out", spec, cid))
    assert result.steps == 1 and len(result.history) == 1
    assert _tokens(server, cid) > 0
    saved = (tmp_path / "out" / "config.json").read_text()
    assert token not in saved  # the run record never holds the secret


def test_env_token_through_the_cli(
    server: ThreadedServer, root: Path, pki: Pki, token: str, tmp_path: Path
) -> None:
    config = _one_step(root, tmp_path / "out", _tls_spec(server, pki))
    cid = f"env-{secrets.token_hex(4)}"
    teachers = (
        f"[{{name: svc, endpoints: ['{server.address}'], ca_cert: '{pki.ca_cert}', "
        f"client_cert: '{pki.client_cert}', client_key: '{pki.client_key}', "
        f"server_name: {SERVER_NAME}}}]"
    )
    argv = [
        "--teachers", teachers, "--run.client-id", cid, "--run.steps", "1",
        "--run.out-dir", str(tmp_path / "out"), "--run.progress", "false", "--run.plots", "false",
        "--student.model-dir", config.student.model_dir, "--data.prompts", config.data.prompts,
        "--rollout.prompts-per-step", "2", "--rollout.group-size", "2",
        "--rollout.max-new-tokens", "4", "--dense.k", "8", "--run.num-threads", "1",
    ]  # fmt: skip
    parsed, _ = parse_args(argv, environ={AUTH_TOKEN_ENV: f" {token}\n"})
    assert parsed.teachers[0].bearer_token() == token
    assert train(parsed).steps == 1
    assert _tokens(server, cid) > 0


@pytest.mark.parametrize("sent", ["none", "wrong token", "wrong token_file"])
def test_missing_or_wrong_token_fails_at_start_saying_why(
    server: ThreadedServer, root: Path, pki: Pki, sent: str, tmp_path: Path
) -> None:
    wrong = secrets.token_hex(16)
    if sent == "none":
        auth, message = {}, "no bearer token was sent"
    elif sent == "wrong token":
        auth, message = {"token": wrong}, "the bearer token .* was refused"
    else:
        (tmp_path / "t").write_text(wrong)
        auth, message = {"token_file": str(tmp_path / "t")}, f"token_file {tmp_path / 't'}"
    config = _one_step(root, tmp_path / "out", _tls_spec(server, pki, **auth))
    with pytest.raises(TeacherAuthError, match=message) as error:
        train(config)
    assert "UNAUTHENTICATED" in str(error.value) and "'svc'" in str(error.value)
    assert wrong not in str(error.value)  # the error names the source, never the secret
