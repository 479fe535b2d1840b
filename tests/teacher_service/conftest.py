"""Shared fixtures for the teacher-service tests: random model directories and servers.

Model directories are built once per session (a Llama with random weights and a
word-level tokenizer, see teacher_service.random_model). `tiny_server` is one real
server (gRPC + HTTP on 127.0.0.1, port 0) shared by the tests that only read from it;
tests that change server state (drain, security, scheduler knobs) start their own with
`start_thread_server`.

Other packages' tests may use these fixtures by importing them into their conftest:

    from tests.teacher_service.conftest import tiny_model_dir, tiny_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teacher_service.config import ModelSpec, ServerConfig
from teacher_service.random_model import save_random_model
from teacher_service.server import ThreadedServer, serve_in_thread

TINY_VOCAB = 512
MICRO_VOCAB = 40  # small enough that top_k may cover the whole vocabulary


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 model with V = 512 and 256 positions."""
    return save_random_model(
        tmp_path_factory.mktemp("tiny"),
        TINY_VOCAB,
        hidden=32,
        layers=2,
        heads=4,
        max_positions=256,
        seed=1,
    )


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer model with V = 40, so that top_k = V is allowed."""
    return save_random_model(
        tmp_path_factory.mktemp("micro"),
        MICRO_VOCAB,
        hidden=16,
        layers=1,
        heads=2,
        max_positions=64,
        seed=2,
    )


def local_config(*models: tuple[str, Path], **overrides: object) -> ServerConfig:
    """A ServerConfig bound to 127.0.0.1 with free ports and no grace period."""
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "grace_seconds": 0.0,
        "max_message_bytes": 1024 * 1024,
    }
    fields.update(overrides)
    specs = tuple(ModelSpec(name, path) for name, path in models)
    return ServerConfig(models=specs, **fields)  # type: ignore[arg-type]


def start_thread_server(*models: tuple[str, Path], **overrides: object) -> ThreadedServer:
    return serve_in_thread(local_config(*models, **overrides))


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, micro_model_dir: Path) -> Iterator[ThreadedServer]:
    """One server hosting 'tiny' (the default) and 'micro'; max message 1 MiB."""
    server = start_thread_server(("tiny", tiny_model_dir), ("micro", micro_model_dir))
    try:
        yield server
    finally:
        server.stop()
