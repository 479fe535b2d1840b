"""Connect-time handshake: a mismatched teacher fails fast with a message naming what
differs and both values; a replica that missed the handshake is checked before use."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from teacher_service.fingerprint import tokenizer_fingerprint
from teacher_service.random_model import build_tokenizer
from teacher_service.server import ThreadedServer
from tests.trainer.client_fixtures import (  # noqa: F401
    VOCAB,
    ServerProcess,
    model_dir,
    other_model_dir,
    random_specs,
    thread_server,
)
from trainer.client import ClientConfig, HandshakeError, TeacherClient


@pytest.fixture(scope="module")
def shared_server(model_dir: Path) -> Iterator[ThreadedServer]:  # noqa: F811
    server = thread_server(model_dir)
    try:
        yield server
    finally:
        server.stop()


def _teacher_fingerprint(vocab: int) -> str:
    return tokenizer_fingerprint(build_tokenizer(vocab))


def test_matching_student_connects(shared_server: ThreadedServer) -> None:
    with TeacherClient(ClientConfig(endpoints=(shared_server.address,))) as client:
        info = client.connect(vocab_size=VOCAB, tokenizer_fingerprint=_teacher_fingerprint(VOCAB))
    assert info.vocab_size == VOCAB
    assert info.name == "teacher"
    assert info.endpoint == shared_server.address
    assert torch.float16 in info.logprob_dtypes


def test_vocab_size_mismatch_names_both_sizes(
    shared_server: ThreadedServer, gen: torch.Generator
) -> None:
    student_vocab = VOCAB + int(torch.randint(1, 500, (1,), generator=gen))
    with (
        TeacherClient(ClientConfig(endpoints=(shared_server.address,))) as client,
        pytest.raises(HandshakeError) as error,
    ):
        client.connect(vocab_size=student_vocab)
    message = str(error.value)
    assert f"vocab size: student {student_vocab} vs teacher {VOCAB}" in message
    assert shared_server.address in message
    assert "tokenizer" not in message  # only what differs


def test_tokenizer_mismatch_names_both_fingerprints(
    shared_server: ThreadedServer, gen: torch.Generator
) -> None:
    # A real tokenizer whose id -> token mapping differs (one more token).
    student_vocab = VOCAB + int(torch.randint(1, 50, (1,), generator=gen))
    student_fp = _teacher_fingerprint(student_vocab)
    with (
        TeacherClient(ClientConfig(endpoints=(shared_server.address,))) as client,
        pytest.raises(HandshakeError) as error,
    ):
        client.connect(vocab_size=VOCAB, tokenizer_fingerprint=student_fp)
    message = str(error.value)
    assert f"tokenizer fingerprint: student {student_fp} vs teacher " in message
    assert _teacher_fingerprint(VOCAB) in message
    assert "vocab size" not in message


def test_both_mismatches_are_reported_together(shared_server: ThreadedServer) -> None:
    with (
        TeacherClient(ClientConfig(endpoints=(shared_server.address,))) as client,
        pytest.raises(HandshakeError, match=r"vocab size: .*; tokenizer fingerprint: "),
    ):
        client.connect(vocab_size=VOCAB * 2, tokenizer_fingerprint="0" * 64)


def test_missing_teacher_names_what_is_hosted(shared_server: ThreadedServer) -> None:
    config = ClientConfig(endpoints=(shared_server.address,), teacher="llama-70b")
    with TeacherClient(config) as client, pytest.raises(HandshakeError) as error:
        client.connect()
    assert str(error.value) == (
        f"teacher 'llama-70b' is not hosted by endpoint {shared_server.address}; "
        "it hosts: 'teacher'"
    )


def test_replicas_serving_different_checkpoints_are_refused(
    shared_server: ThreadedServer,
    other_model_dir: Path,  # noqa: F811
) -> None:
    other = thread_server(other_model_dir)
    try:
        config = ClientConfig(endpoints=(shared_server.address, other.address))
        with (
            TeacherClient(config) as client,
            pytest.raises(HandshakeError, match=r"does not match: model name: model-11 at "),
        ):
            client.connect(vocab_size=VOCAB)
    finally:
        other.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("same_checkpoint", [True, False])
def test_replica_down_at_connect_is_checked_before_its_first_request(
    shared_server: ThreadedServer,
    model_dir: Path,  # noqa: F811
    other_model_dir: Path,  # noqa: F811
    gen: torch.Generator,
    same_checkpoint: bool,
) -> None:
    port = _free_port()
    late_address = f"127.0.0.1:{port}"
    config = ClientConfig(endpoints=(shared_server.address, late_address), backoff_base_s=0.01)
    with TeacherClient(config) as client:
        client.connect(vocab_size=VOCAB)  # the late replica is not up yet
        late = thread_server(model_dir if same_checkpoint else other_model_dir, grpc_port=port)
        try:
            # Rounds until the late replica's channel has reconnected and been checked.
            results = []
            for _ in range(50):
                results += client.score_batch(random_specs(gen, 10, max_len=24))
                state = client._client._balancer.endpoints[late_address]
                if state.verified or state.disabled:
                    results += client.score_batch(random_specs(gen, 20, max_len=24))
                    break
                time.sleep(0.05)
            excluded = client._client._balancer.endpoints[late_address].disabled
            scored_late = late.metrics.registry.get_sample_value(
                "teacher_service_requests_total", {"method": "ScoreStream", "code": "OK"}
            )
        finally:
            late.stop()
    served = {r.endpoint for r in results}
    if same_checkpoint:
        assert excluded is None
        assert served == {shared_server.address, late_address}
        assert scored_late is not None and scored_late >= 1
    else:
        assert excluded is not None and "model name: model-11" in excluded
        assert served == {shared_server.address}
        assert not scored_late  # never handed a sequence
