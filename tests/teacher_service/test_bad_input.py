"""Bad input over real gRPC: INVALID_ARGUMENT naming the field and the bound, never
INTERNAL, never a crash; oversize messages refused by gRPC; per-request errors on
ScoreStream that leave the stream open; a hypothesis fuzzer beside a good client.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_service.codec import decode_result
from teacher_service.server import ThreadedServer
from teacher_service.v1 import teacher_pb2 as pb
from tests.teacher_service.conftest import TINY_VOCAB
from tests.teacher_service.wire import Reference, make_request, random_sequence, stub

MAX_LEN = 256  # tiny model's max_position_embeddings
MAX_TOP_K = 64


def _good(gen: torch.Generator) -> pb.ScoreRequest:
    ids, start = random_sequence(gen, TINY_VOCAB, min_len=4, max_len=40)
    return make_request(ids, start, 4)


def _set(field: str, value: object) -> Callable[[pb.ScoreRequest], None]:
    return lambda r: setattr(r, field, value)


def _tensor(field: str, dtype: int, shape: list[int], data: bytes) -> Callable:
    def mutate(r: pb.ScoreRequest) -> None:
        getattr(r, field).CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=data))

    return mutate


def _ids(values: list[int]) -> Callable:
    data = torch.tensor(values, dtype=torch.int32).numpy().tobytes()
    return _tensor("token_ids", pb.DTYPE_INT32, [len(values)], data)


def _query(rows_delta: int, width: int, value: int = 5) -> Callable:
    def mutate(r: pb.ScoreRequest) -> None:
        rows = r.token_ids.shape[0] - r.start + rows_delta
        q = torch.full((rows, width), value, dtype=torch.int32)
        r.query_ids.CopyFrom(
            pb.Tensor(dtype=pb.DTYPE_INT32, shape=[rows, width], data=q.numpy().tobytes())
        )

    return mutate


# (case id, mutation, words the message must contain: the field and the bound)
BAD_CASES: list[tuple[str, Callable[[pb.ScoreRequest], None], list[str]]] = [
    ("missing ids", lambda r: r.ClearField("token_ids"), ["token_ids", "required"]),
    ("empty sequence", _ids([]), ["token_ids", "empty", f"{MAX_LEN}"]),
    ("one token", _ids([5]), ["token_ids", "L >= 2"]),
    ("too long", _ids([5] * (MAX_LEN + 1)), ["token_ids", f"{MAX_LEN + 1}", f"{MAX_LEN}"]),
    ("id >= vocab", _ids([5, 6, TINY_VOCAB]), ["token_ids[2]", f"{TINY_VOCAB}", "[0, 512)"]),
    ("negative id", _ids([5, -1, 7]), ["token_ids[1]", "-1", "[0, 512)"]),
    (
        "ids as float32",
        _tensor("token_ids", pb.DTYPE_FLOAT32, [2], b"\0" * 8),
        ["token_ids.dtype", "DTYPE_INT32"],
    ),
    (
        "ids 2-d",
        _tensor("token_ids", pb.DTYPE_INT32, [2, 2], b"\0" * 16),
        ["token_ids.shape", "1 dimension"],
    ),
    (
        "ids short data",
        _tensor("token_ids", pb.DTYPE_INT32, [3], b"\0" * 11),
        ["token_ids.data", "12"],
    ),
    ("start 0", _set("start", 0), ["start", "1 <= start"]),
    ("start = L", lambda r: setattr(r, "start", r.token_ids.shape[0]), ["start", "L - 1"]),
    ("start negative", _set("start", -3), ["start", "-3"]),
    ("top_k 0", _set("top_k", 0), ["top_k", "1 <= top_k", f"{MAX_TOP_K}"]),
    ("top_k too big", _set("top_k", MAX_TOP_K + 1), ["top_k", f"{MAX_TOP_K}"]),
    ("unknown teacher", _set("teacher", "nope"), ["teacher", "nope", "tiny"]),
    ("query rows", _query(+1, 3), ["query_ids.shape", "R = L - start"]),
    (
        "query 1-d",
        _tensor("query_ids", pb.DTYPE_INT32, [4], b"\0" * 16),
        ["query_ids.shape", "2 dimensions"],
    ),
    ("query too wide", _query(0, 257), ["query_ids.shape", "Q = 257", "256"]),
    ("query zero wide", _query(0, 0), ["query_ids.shape", "Q = 0"]),
    ("query id outside", _query(0, 2, TINY_VOCAB + 3), ["query_ids[0,0]", "[0, 512)"]),
    ("unknown dtype", _set("logprob_dtype", 42), ["logprob_dtype", "42"]),
    ("int32 logprobs", _set("logprob_dtype", pb.DTYPE_INT32), ["logprob_dtype", "DTYPE_INT32"]),
    ("temperature 0", _set("temperature", 0.0), ["temperature", "> 0"]),
    ("temperature < 0", _set("temperature", -1.0), ["temperature", "> 0"]),
    ("temperature nan", _set("temperature", math.nan), ["temperature", "finite"]),
    ("temperature inf", _set("temperature", math.inf), ["temperature", "finite"]),
]


@pytest.mark.parametrize(
    ("mutate", "words"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_score_refuses_bad_input_naming_field_and_bound(
    tiny_server: ThreadedServer, mutate: Callable, words: list[str]
) -> None:
    request = _good(torch.Generator().manual_seed(hash(tuple(words)) % 1000))
    mutate(request)
    channel, client = stub(tiny_server.address)
    with channel, pytest.raises(grpc.RpcError) as caught:
        client.Score(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in caught.value.details(), (word, caught.value.details())


def test_stream_answers_each_bad_request_and_stays_open(
    tiny_server: ThreadedServer, tiny_model_dir: Path
) -> None:
    gen = torch.Generator().manual_seed(9)
    requests, good = [], {}
    for i, (_name, mutate, words) in enumerate(BAD_CASES):
        bad = _good(gen)
        mutate(bad)
        bad.request_id = f"bad{i}"
        requests.append((bad, words))
        ok = _good(gen)
        ok.request_id = f"good{i}"
        good[ok.request_id] = ok
        requests.append((ok, None))
    expected_words = {r.request_id: w for r, w in requests if w is not None}
    channel, client = stub(tiny_server.address)
    with channel:
        responses = list(client.ScoreStream(iter([r for r, _ in requests])))
    assert len(responses) == len(requests)
    ref = Reference.load(tiny_model_dir)
    for response in responses:
        if response.request_id in expected_words:
            assert response.WhichOneof("outcome") == "error"
            assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            for word in expected_words[response.request_id]:
                assert word in response.error.message
        else:
            assert response.WhichOneof("outcome") == "result"
            sent = good[response.request_id]
            ids = torch.frombuffer(bytearray(sent.token_ids.data), dtype=torch.int32)
            expected = ref.logprobs(ids, sent.start).gather(1, ids[sent.start :, None].long())
            got = decode_result(response.result).token_logprobs
            torch.testing.assert_close(got, expected[:, 0], atol=1e-5, rtol=1e-5)


def test_duplicate_request_id_in_flight_is_refused(tiny_server: ThreadedServer) -> None:
    gen = torch.Generator().manual_seed(11)
    first, second = _good(gen), _good(gen)
    first.request_id = second.request_id = "same"
    channel, client = stub(tiny_server.address)
    with channel:
        outcomes = [r.WhichOneof("outcome") for r in client.ScoreStream(iter([first, second]))]
    # The second may arrive after the first finished (then both succeed); when it
    # arrives while the first is in flight it is refused. Either way nothing is lost.
    assert len(outcomes) == 2 and "result" in outcomes


def test_oversize_message_is_refused_by_grpc(tiny_server: ThreadedServer) -> None:
    request = _good(torch.Generator().manual_seed(3))
    request.request_id = "x" * (1024 * 1024 + 10)  # the server accepts at most 1 MiB
    channel, client = stub(tiny_server.address)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            client.Score(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is fine afterwards, on the same channel.
        assert client.Score(_good(torch.Generator().manual_seed(4))).topk_ids.shape[0] > 0


# -- fuzzing ---------------------------------------------------------------------------

_DTYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 99, -1])
_INT32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def _tensors(draw: st.DrawFn) -> pb.Tensor:
    shape = draw(st.lists(st.integers(-3, 300), max_size=3))
    size = draw(st.integers(0, 1200))
    if draw(st.booleans()):  # consistent int32 data with random ids
        n = max(0, math.prod(shape)) if shape and all(d >= 0 for d in shape) else 0
        n = min(n, 300)
        values = draw(st.lists(st.integers(-5, TINY_VOCAB + 5), min_size=n, max_size=n))
        data = torch.tensor(values, dtype=torch.int32).numpy().tobytes()
        return pb.Tensor(dtype=draw(_DTYPES), shape=shape, data=data)
    return pb.Tensor(dtype=draw(_DTYPES), shape=shape, data=draw(st.binary(max_size=size)))


@st.composite
def _requests(draw: st.DrawFn) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        request_id=draw(st.text(max_size=8)),
        teacher=draw(st.sampled_from(["", "tiny", "micro", "nope", "\x00"])),
        start=draw(st.one_of(_INT32, st.integers(-2, 10))),
        top_k=draw(st.one_of(_INT32, st.integers(-2, 70))),
        logprob_dtype=draw(_DTYPES),
    )
    if draw(st.booleans()):
        request.token_ids.CopyFrom(draw(_tensors()))
    if draw(st.booleans()):
        request.query_ids.CopyFrom(draw(_tensors()))
    if draw(st.booleans()):
        request.temperature = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    return request


class _GoodClient(threading.Thread):
    """Scores fresh random sequences in a loop and checks each against the reference."""

    def __init__(self, address: str, ref: Reference) -> None:
        super().__init__(daemon=True)
        self._address = address
        self._ref = ref
        self.stop = threading.Event()
        self.checked = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        gen = torch.Generator().manual_seed(2024)
        channel, client = stub(self._address)
        with channel:
            while not self.stop.is_set():
                try:
                    ids, start = random_sequence(gen, TINY_VOCAB, max_len=60)
                    got = decode_result(client.Score(make_request(ids, start, 5)))
                    expected = self._ref.logprobs(ids, start)
                    torch.testing.assert_close(
                        got.token_logprobs,
                        expected.gather(1, ids[start:, None])[:, 0],
                        atol=1e-5,
                        rtol=1e-5,
                    )
                    self.checked += 1
                except BaseException as exc:
                    self.errors.append(exc)
                    return


@pytest.fixture(scope="module")
def good_client(tiny_server: ThreadedServer, tiny_model_dir: Path):
    client = _GoodClient(tiny_server.address, Reference.load(tiny_model_dir))
    client.start()
    yield client
    client.stop.set()
    client.join(timeout=30)
    assert not client.errors, client.errors
    assert client.checked > 0


@pytest.fixture(scope="module")
def fuzz_channel(tiny_server: ThreadedServer):
    channel, client = stub(tiny_server.address)
    with channel:
        yield client


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=_requests())
def test_malformed_requests_never_crash_or_disturb_others(
    good_client: _GoodClient, fuzz_channel, request: pb.ScoreRequest
) -> None:
    try:
        response = fuzz_channel.Score(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert ":" in error.details()  # "field: what is wrong"
    else:  # the fuzzer found a valid request: its answer must be well formed
        got = decode_result(response)
        assert got.topk_ids.shape[1] == request.top_k
    assert not good_client.errors, good_client.errors
