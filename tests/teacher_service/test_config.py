"""CLI flags -> ServerConfig: defaults, repeated --model, the auth token's sources, and
refusals that name the offending flag.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

import hybrid_distill_cli as cli
from teacher_service.config import AUTH_TOKEN_ENV, ModelSpec, ServerConfig, parse_args


def test_defaults_from_the_issue() -> None:
    config = parse_args(["--model", "/models/llama"], env={})
    assert config.models == (ModelSpec("llama", Path("/models/llama")),)
    assert config.default_teacher == "llama"
    assert (config.host, config.backend, config.max_top_k) == ("0.0.0.0", "torch", 64)
    assert (config.max_query_ids, config.grace_seconds) == (256, 30.0)
    assert config.auth_token is None and config.tls_cert is None
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_top_k = 3  # type: ignore[misc]


def test_repeated_models_with_names_first_is_default() -> None:
    config = parse_args(
        ["--model", "big=/m/a", "--model", "/m/small", "--grpc-port", "7", "--http-port", "8"],
        env={},
    )
    assert [m.name for m in config.models] == ["big", "small"]
    assert config.models[0].path == Path("/m/a")
    assert config.default_teacher == "big"
    assert (config.grpc_port, config.http_port) == (7, 8)


def test_flags_reach_the_config() -> None:
    config = parse_args(
        [
            "--model",
            "m",
            "--backend",
            "vllm",
            "--device",
            "cuda:1",
            "--dtype",
            "bfloat16",
            "--max-top-k",
            "20",
            "--max-query-ids",
            "9",
            "--max-sequence-length",
            "4096",
            "--max-batch-tokens",
            "999",
            "--max-batch-size",
            "7",
            "--max-wait-ms",
            "5",
            "--max-queued-tokens",
            "1000",
            "--max-client-queued-tokens",
            "100",
            "--max-message-bytes",
            "12345",
            "--grace-seconds",
            "2.5",
            "--max-client-labels",
            "3",
            "--host",
            "127.0.0.1",
            "--torch-threads",
            "1",
            "--tensor-parallel-size",
            "2",
            "--gpu-memory-utilization",
            "0.5",
        ],
        env={},
    )
    assert config.backend == "vllm" and config.device == "cuda:1" and config.dtype == "bfloat16"
    assert (config.max_top_k, config.max_query_ids, config.max_sequence_length) == (20, 9, 4096)
    assert (config.max_batch_tokens, config.max_batch_size) == (999, 7)
    assert config.max_wait_s == pytest.approx(0.005)
    assert (config.max_queued_tokens, config.max_client_queued_tokens) == (1000, 100)
    assert (config.max_message_bytes, config.grace_seconds) == (12345, 2.5)
    assert (config.max_client_labels, config.host, config.torch_threads) == (3, "127.0.0.1", 1)
    assert (config.tensor_parallel_size, config.gpu_memory_utilization) == (2, 0.5)


def test_auth_token_from_env_or_file_and_never_in_repr(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    from_env = parse_args(["--model", "m"], env={AUTH_TOKEN_ENV: f" {token}\n"})
    assert from_env.auth_token == token
    assert token not in repr(from_env)
    file_token = secrets.token_hex(16)
    path = tmp_path / "token"
    path.write_text(file_token + "\n")
    from_file = parse_args(
        ["--model", "m", "--auth-token-file", str(path)], env={AUTH_TOKEN_ENV: token}
    )
    assert from_file.auth_token == file_token  # the file wins over the environment


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--model", "a=/x", "--model", "a=/y"], "unique"),
        (["--model", "m", "--tls-cert", "c.pem"], "--tls-cert"),
        (["--model", "m", "--tls-client-ca", "ca.pem"], "--tls-client-ca"),
        (["--model", "m", "--max-top-k", "0"], "--max-top-k"),
        (["--model", "m", "--grpc-port", "70000"], "--grpc-port"),
        (["--model", "m", "--backend", "tensorrt"], "--backend"),
        (["--model", "m", "--auth-token-file", "/no/such/file"], "--auth-token-file"),
        (["--grpc-port", "1"], "--model"),
    ],
)
def test_bad_flags_exit_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv, env={})
    assert caught.value.code == 2
    assert flag in capsys.readouterr().err


def test_config_needs_a_model() -> None:
    with pytest.raises(ValueError, match="--model"):
        ServerConfig(models=())


def test_console_command_dispatches_serve_to_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "hybrid-distill serve" in out and "--model [NAME=]DIR" in out
