"""Bytes that are not a request, sent over raw gRPC (identity serializers, as a hostile
or broken client would): INVALID_ARGUMENT naming the problem on every RPC, counted in
the request metrics, at most one log line under a flood (with or without a token
configured), and on ScoreStream an error for the bad frame while the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from teacher_service.codec import decode_result
from teacher_service.server import ThreadedServer
from teacher_service.v1 import teacher_pb2 as pb
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import Reference, make_request, random_sequence

SERVICE = "/teacher_service.v1.TeacherService/"
TOKEN = "s3cret-token"
FLOOD = 150


def _identity(data: bytes) -> bytes:
    return data


def _valid(seed: int, request_id: str = "") -> pb.ScoreRequest:
    ids, start = random_sequence(torch.Generator().manual_seed(seed), TINY_VOCAB, 4, 30)
    return make_request(ids, start, 3, request_id=request_id)


def _truncated_mid_field(seed: int) -> bytes:
    """A valid request cut inside its token_ids tensor: a length prefix runs past the end."""
    raw = _valid(seed, request_id="r").SerializeToString()
    return raw[: len(raw) // 2]


# (case, bytes) for each class of unparsable input; `words` must appear in the message.
UNPARSABLE: list[tuple[str, Callable[[int], bytes]]] = [
    ("0xff x3", lambda seed: b"\xff\xff\xff"),
    ("truncated", _truncated_mid_field),
    # field 1 (request_id, a string) holding invalid UTF-8
    ("bad utf-8", lambda seed: b"\x0a\x02\xff\xfe"),
    # a length prefix of 2^32 for field 3 with 3 bytes behind it
    ("huge length", lambda seed: b"\x1a\x80\x80\x80\x80\x10abc"),
    # field number 0 is reserved
    ("field 0", lambda seed: b"\x00\x01"),
]
# Bytes that parse (protobuf keeps a wrongly typed field as unknown) but are no request.
PARSABLE_BUT_EMPTY: list[tuple[str, bytes, str]] = [
    ("token_ids as varint", b"\x18\x05", "token_ids: required"),
    ("empty message", b"", "token_ids: required"),
]


def _raw_score(channel: grpc.Channel) -> Callable:
    return channel.unary_unary(
        SERVICE + "Score", request_serializer=_identity, response_deserializer=_identity
    )


def _requests_total(server: ThreadedServer, method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    value = server.metrics.registry.get_sample_value("teacher_service_requests_total", labels)
    return value or 0.0


@pytest.mark.parametrize(("make_bytes"), [c[1] for c in UNPARSABLE], ids=[c[0] for c in UNPARSABLE])
def test_unparsable_score_is_invalid_argument_and_counted(
    tiny_server: ThreadedServer, make_bytes: Callable[[int], bytes]
) -> None:
    raw = make_bytes(int(torch.randint(0, 10_000, ())))
    before = _requests_total(tiny_server, "Score", "INVALID_ARGUMENT")
    with (
        grpc.insecure_channel(tiny_server.address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        _raw_score(channel)(raw, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    details = caught.value.details()
    assert f"request: {len(raw)} bytes are not a valid teacher_service.v1.ScoreRequest" in details
    assert len(details) < 300
    assert _requests_total(tiny_server, "Score", "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(
    ("raw", "words"), [c[1:] for c in PARSABLE_BUT_EMPTY], ids=[c[0] for c in PARSABLE_BUT_EMPTY]
)
def test_wrongly_typed_fields_fail_validation(
    tiny_server: ThreadedServer, raw: bytes, words: str
) -> None:
    with (
        grpc.insecure_channel(tiny_server.address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        _raw_score(channel)(raw, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in caught.value.details()


def test_unparsable_info_is_invalid_argument(tiny_server: ThreadedServer) -> None:
    before = _requests_total(tiny_server, "Info", "INVALID_ARGUMENT")
    with grpc.insecure_channel(tiny_server.address) as channel:
        info = channel.unary_unary(
            SERVICE + "Info", request_serializer=_identity, response_deserializer=_identity
        )
        with pytest.raises(grpc.RpcError) as caught:
            info(b"\xff\xff\xff", timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "teacher_service.v1.InfoRequest" in caught.value.details()
        # A well-formed InfoRequest still works on the same channel.
        reply = pb.InfoResponse.FromString(info(b"", timeout=30))
        assert reply.default_teacher == "tiny"
    assert _requests_total(tiny_server, "Info", "INVALID_ARGUMENT") == before + 1


OPEN_METHODS = [
    ("/grpc.health.v1.Health/Check", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "unary_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
]


@pytest.mark.parametrize(("method", "kind"), OPEN_METHODS, ids=[m for m, _ in OPEN_METHODS])
def test_unparsable_bytes_on_open_services_are_invalid_argument(
    tiny_server: ThreadedServer, method: str, kind: str
) -> None:
    """Health and reflection (open without a token) refuse bytes that do not parse."""
    with grpc.insecure_channel(tiny_server.address) as channel:
        call = getattr(channel, kind)(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        with pytest.raises(grpc.RpcError) as caught:
            if kind == "stream_stream":
                list(call(iter([b"\xff\xff\xff"]), timeout=30))
            elif kind == "unary_stream":
                next(iter(call(b"\xff\xff\xff", timeout=30)))
            else:
                call(b"\xff\xff\xff", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith("request: 3 bytes do not parse")


def test_corrupt_frames_on_a_stream_get_errors_and_the_stream_goes_on(
    tiny_server: ThreadedServer, tiny_model_dir: Path
) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    print(f"seed={seed}")
    good = {f"good{i}": _valid(seed + i, request_id=f"good{i}") for i in range(4)}
    frames = []
    for i, (_name, make_bytes) in enumerate(UNPARSABLE[:4]):
        frames.append(good[f"good{i}"].SerializeToString())
        frames.append(make_bytes(seed + 100 + i))
    before = _requests_total(tiny_server, "ScoreStream", "INVALID_ARGUMENT")
    with grpc.insecure_channel(tiny_server.address) as channel:
        call = channel.stream_stream(
            SERVICE + "ScoreStream",
            request_serializer=_identity,
            response_deserializer=pb.ScoreStreamResponse.FromString,
        )
        responses = list(call(iter(frames), timeout=60))
    assert len(responses) == len(frames)
    errors = [r for r in responses if r.WhichOneof("outcome") == "error"]
    results = {r.request_id: r.result for r in responses if r.WhichOneof("outcome") == "result"}
    assert len(errors) == 4 and set(results) == set(good)
    for error in errors:
        assert error.request_id == ""  # the frame's id could not be read
        assert error.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "not a valid teacher_service.v1.ScoreRequest" in error.error.message
    ref = Reference.load(tiny_model_dir)
    for request_id, result in results.items():
        sent = good[request_id]
        ids = torch.frombuffer(bytearray(sent.token_ids.data), dtype=torch.int32).long()
        expected = ref.logprobs(ids, sent.start).gather(1, ids[sent.start :, None])[:, 0]
        got = decode_result(result).token_logprobs
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert _requests_total(tiny_server, "ScoreStream", "INVALID_ARGUMENT") == before + 4


@pytest.fixture(params=[None, TOKEN], ids=["open", "token"])
def fresh_server(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[ThreadedServer]:
    """A server of its own, so that its rate-limited log starts fresh."""
    server = start_thread_server(("tiny", tiny_model_dir), auth_token=request.param)
    try:
        yield server
    finally:
        server.stop()


def test_a_flood_of_corrupt_requests_logs_at_most_one_line(
    fresh_server: ThreadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(fresh_server.address) as channel:
        score = _raw_score(channel)
        stream = channel.stream_stream(
            SERVICE + "ScoreStream",
            request_serializer=_identity,
            response_deserializer=pb.ScoreStreamResponse.FromString,
        )
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        codes, health_codes = set(), set()
        for i in range(FLOOD):
            try:
                score(UNPARSABLE[i % len(UNPARSABLE)][1](i), timeout=30)
            except grpc.RpcError as error:
                codes.add(error.code())
            try:
                health(UNPARSABLE[i % len(UNPARSABLE)][1](i), timeout=30)
            except grpc.RpcError as error:
                health_codes.add(error.code())
        streamed = []
        try:
            streamed.extend(stream(iter([b"\xff\xff\xff"] * FLOOD), timeout=60))
        except grpc.RpcError as error:
            codes.add(error.code())
    assert health_codes == {grpc.StatusCode.INVALID_ARGUMENT}  # open even with a token
    expected = grpc.StatusCode.UNAUTHENTICATED if fresh_server.config.auth_token else None
    if expected is None:
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        assert len(streamed) == FLOOD
    else:
        assert codes == {expected} and not streamed
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and _about_requests(r)]
    # One line per kind at most: Score's refusals (or the token's), health's refusals.
    by_logger = {r.name: [x for x in lines if x.name == r.name] for r in lines}
    assert all(len(v) <= 1 for v in by_logger.values()), [r.getMessage() for r in lines]
    assert len(lines) <= 2, [r.getMessage() for r in lines]
    tracebacks = [(r.name, r.getMessage(), r.exc_info) for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks


def _about_requests(record: logging.LogRecord) -> bool:
    """Records about refused or failed calls (not the server's start and stop lines)."""
    return record.name.startswith("grpc") or any(
        word in record.getMessage() for word in ("refused", "failed", "rror", "xception")
    )
