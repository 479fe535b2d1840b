"""Bad input over real gRPC: INVALID_ARGUMENT naming the field and the bound, never
INTERNAL, never a crash; echoed values bounded so that the status fits the client's
metadata limit; oversize messages refused by gRPC; per-request errors on ScoreStream
that leave the stream open; a duplicate in-flight request id refused; a hypothesis
fuzzer beside a good client. (Bytes that are no message: test_corrupt_input.py.)
"""

from __future__ import annotations

import math
import random
import string
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_service.codec import decode_result
from teacher_service.server import ThreadedServer
from teacher_service.v1 import teacher_pb2 as pb
from tests.teacher_service.conftest import TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import Reference, make_request, random_sequence, stub

MAX_LEN = 256  # tiny model's max_position_embeddings
MAX_TOP_K = 64
TEMPERATURE_BOUND = "0.01 <= temperature <= 100"
MAX_DETAILS = 300  # every refusal below fits in this many characters


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
    (
        "ids negative length",
        _tensor("token_ids", pb.DTYPE_INT32, [-3], b""),
        ["token_ids.shape", "L = -3", ">= 0"],
    ),
    (
        "ids 100000-d",
        _tensor("token_ids", pb.DTYPE_INT32, [1] * 100_000, b"\0" * 4),
        ["token_ids.shape", "1 dimension", "(100000 dimensions)"],
    ),
    (
        "ids 2^40 long",
        _tensor("token_ids", pb.DTYPE_INT32, [2**40], b"\0" * 8),
        ["token_ids", f"{2**40}", f"{MAX_LEN}"],
    ),
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
    ("20 kB teacher", _set("teacher", "n" * 20_000), ["teacher", "[+19936 chars]", "tiny"]),
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
    ("temperature 0", _set("temperature", 0.0), ["temperature: 0 ", TEMPERATURE_BOUND]),
    ("temperature < 0", _set("temperature", -1.0), ["temperature: -1 ", TEMPERATURE_BOUND]),
    ("temperature nan", _set("temperature", math.nan), ["temperature: nan", TEMPERATURE_BOUND]),
    ("temperature inf", _set("temperature", math.inf), ["temperature: inf", TEMPERATURE_BOUND]),
    # 1e-38 once passed ("finite and > 0") and came back as all-NaN log-probs with OK.
    ("temperature 1e-38", _set("temperature", 1e-38), ["temperature: 1e-38", TEMPERATURE_BOUND]),
    ("temperature 9e-3", _set("temperature", 9e-3), ["temperature: 0.009", TEMPERATURE_BOUND]),
    ("temperature 101", _set("temperature", 101.0), ["temperature: 101", TEMPERATURE_BOUND]),
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
    assert len(caught.value.details()) <= MAX_DETAILS


@pytest.mark.parametrize("temperature", [0.01, 0.5, 100.0])
def test_temperature_bounds_are_inclusive(
    tiny_server: ThreadedServer, tiny_model_dir: Path, temperature: float
) -> None:
    """0.01 and 100 are inside (compared as float32, the wire's type), and the rows are
    log_softmax(logits / T)."""
    gen = torch.Generator().manual_seed(int(temperature * 1000))
    ids, start = random_sequence(gen, TINY_VOCAB, min_len=4, max_len=40)
    channel, client = stub(tiny_server.address)
    with channel:
        got = decode_result(client.Score(make_request(ids, start, 4, temperature=temperature)))
    expected = Reference.load(tiny_model_dir).logprobs(ids, start, temperature)
    want = expected.gather(1, ids[start:, None])[:, 0]
    torch.testing.assert_close(got.token_logprobs, want, atol=1e-4, rtol=1e-4)
    assert bool(torch.isfinite(got.topk_logprobs).all())


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


@pytest.fixture(scope="module")
def waiting_server(tiny_model_dir: Path) -> Iterator[ThreadedServer]:
    """Batches of exactly 2 sequences: a lone sequence waits (up to 10 s) for company, so
    a test decides when a sequence is in flight and when it finishes."""
    server = start_thread_server(
        ("tiny", tiny_model_dir), max_batch_size=2, max_wait_s=10.0, max_message_bytes=4 << 20
    )
    try:
        yield server
    finally:
        server.stop()


def test_duplicate_request_id_in_flight_is_refused(waiting_server: ThreadedServer) -> None:
    """A waits in the queue for company; B reuses its id while A is in flight and is
    refused; C fills A's batch; once A is answered, D may reuse the id (with E)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    sent = {name: _good(gen) for name in "ABCDE"}
    for name, request_id in zip("ABCDE", ["same", "same", "c", "same", "e"], strict=True):
        sent[name].request_id = request_id
    first_answered = threading.Event()

    def requests() -> Iterator[pb.ScoreRequest]:
        yield from (sent["A"], sent["B"], sent["C"])
        assert first_answered.wait(timeout=60), "A was never answered"
        yield from (sent["D"], sent["E"])

    outcomes: list[tuple[str, str, pb.RequestError]] = []
    channel, client = stub(waiting_server.address)
    with channel:
        for response in client.ScoreStream(requests(), timeout=60):
            kind = response.WhichOneof("outcome")
            outcomes.append((response.request_id, kind, response.error))
            if response.request_id == "same" and kind == "result":
                first_answered.set()
    same = [(kind, error) for request_id, kind, error in outcomes if request_id == "same"]
    errors = [error for kind, error in same if kind == "error"]
    assert [kind for kind, _ in same].count("result") == 2, outcomes  # A and D
    assert len(errors) == 1, outcomes  # B
    assert errors[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors[0].message == "request_id: 'same' is already in flight on this stream"
    # The refusal came before A's answer: B was refused while A was in flight.
    assert [kind for request_id, kind, _ in outcomes][:1] == ["error"]
    assert sorted(r for r, kind, _ in outcomes if kind == "result") == ["c", "e", "same", "same"]


@pytest.mark.parametrize("size", [20_000, 1 << 20], ids=["20kB", "1MiB"])
def test_echoed_values_are_bounded(waiting_server: ThreadedServer, size: int) -> None:
    """A huge teacher name or request id comes back cut short with a marker, so the status
    fits the client's metadata limit (8 KiB) and the client sees INVALID_ARGUMENT."""
    gen = torch.Generator().manual_seed(size)
    name = "".join(random.Random(size).choices(string.ascii_letters, k=size))
    unknown = _good(gen)
    unknown.teacher = name
    channel, client = stub(waiting_server.address)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            client.Score(unknown, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        details = caught.value.details()
        assert details.startswith(f"teacher: unknown teacher {name[:64]!r}...[+{size - 64} chars]")
        assert len(details) <= MAX_DETAILS
        # On a stream: the same bound, and a duplicate id of that size is cut short too.
        held, duplicate, partner = _good(gen), _good(gen), _good(gen)
        held.request_id = duplicate.request_id = name
        partner.request_id = "partner"
        unknown.request_id = "unknown"
        responses = list(client.ScoreStream(iter([unknown, held, duplicate, partner]), timeout=60))
    errors = [r.error for r in responses if r.WhichOneof("outcome") == "error"]
    assert len(responses) == 4 and len(errors) == 2
    for error in errors:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert f"...[+{size - 64} chars]" in error.message
        assert len(error.message) <= MAX_DETAILS


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
    assert not client.is_alive(), "the good client hung (still running 30 s after stop)"
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
