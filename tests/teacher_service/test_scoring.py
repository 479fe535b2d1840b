"""End-to-end scoring over real gRPC against a plain transformers forward.

Each test sends fresh random sequences to a real server and checks every returned array
against log_softmax(logits / T) of an unbatched float32 forward (tests/.../wire.py):
top-K sorted and truly the K largest, token log-probs, query log-probs, leftover mass,
temperature, and the fp16/bf16 output encodings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from teacher_service.codec import decode_result
from teacher_service.random_model import save_random_model
from teacher_service.server import ThreadedServer
from teacher_service.v1 import teacher_pb2 as pb
from tests.teacher_service.conftest import MICRO_VOCAB, TINY_VOCAB, start_thread_server
from tests.teacher_service.wire import Reference, make_request, random_sequence, stub

BIG_VOCAB = 128_000
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_ref(tiny_model_dir: Path) -> Reference:
    return Reference.load(tiny_model_dir)


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedServer, Path]]:
    """A server hosting a V = 128,000 model (hidden 32), above the 100k mark."""
    model_dir = save_random_model(
        tmp_path_factory.mktemp("big"),
        BIG_VOCAB,
        hidden=32,
        layers=1,
        heads=2,
        max_positions=128,
        seed=3,
    )
    server = start_thread_server(("big", model_dir), max_message_bytes=8 * 1024 * 1024)
    try:
        yield server, model_dir
    finally:
        server.stop()


def check_rows(
    response: pb.ScoreResponse,
    ref_logp: torch.Tensor,
    ids: torch.Tensor,
    start: int,
    top_k: int,
    query: torch.Tensor | None = None,
    atol: float = TOL,
) -> None:
    """Asserts every array of `response` against the reference log-probs [R, V]."""
    got = decode_result(response)
    rows = ids.shape[0] - start
    assert got.topk_ids.shape == (rows, top_k) and got.topk_ids.dtype == torch.int32
    assert got.topk_logprobs.shape == (rows, top_k)
    top = got.topk_logprobs.double()
    # Sorted, highest first.
    assert bool((top[:, :-1] >= top[:, 1:]).all())
    # Each returned log-prob is the reference log-prob of its id...
    at_ids = ref_logp.gather(1, got.topk_ids.long()).double()
    torch.testing.assert_close(top, at_ids, atol=atol, rtol=atol)
    # ...and together they are the K largest (up to near-ties within the tolerance).
    kth = ref_logp.topk(top_k, dim=-1).values[:, -1].double()
    assert bool((at_ids[:, -1] >= kth - atol).all())
    assert got.topk_ids.unique(dim=1).shape[1] == top_k or top_k == 1
    # The token that actually followed: row r is ids[start + r].
    expected_token = ref_logp.gather(1, ids[start:, None].long())[:, 0]
    torch.testing.assert_close(
        got.token_logprobs.double(), expected_token.double(), atol=atol, rtol=atol
    )
    # Leftover: log of the mass outside the returned top-K, from the reference in float64.
    rest = ref_logp.double().scatter(1, got.topk_ids.long(), float("-inf"))
    torch.testing.assert_close(
        got.leftover_logmass.double(), torch.logsumexp(rest, dim=-1), atol=atol, rtol=atol
    )
    if query is None:
        assert got.query_logprobs is None
    else:
        expected_query = ref_logp.gather(1, query.long()).double()
        torch.testing.assert_close(
            got.query_logprobs.double(), expected_query, atol=atol, rtol=atol
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_score_rows_match_transformers_forward(
    tiny_server: ThreadedServer, tiny_ref: Reference, seed: int
) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    channel, client = stub(tiny_server.address)
    with channel:
        for _ in range(4):
            ids, start = random_sequence(gen, TINY_VOCAB, max_len=120)
            top_k = int(torch.randint(1, 65, (1,), generator=gen))
            rows = ids.shape[0] - start
            query = torch.randint(0, TINY_VOCAB, (rows, 7), generator=gen)
            response = client.Score(make_request(ids, start, top_k, query_ids=query))
            assert response.teacher == "tiny"
            check_rows(response, tiny_ref.logprobs(ids, start), ids, start, top_k, query)


def test_stream_rows_match_and_carry_request_ids(
    tiny_server: ThreadedServer, tiny_ref: Reference
) -> None:
    gen = torch.Generator().manual_seed(77)
    sent = {}
    for i in range(6):
        ids, start = random_sequence(gen, TINY_VOCAB, max_len=100)
        sent[f"r{i}"] = (ids, start, int(torch.randint(1, 33, (1,), generator=gen)))
    requests = [make_request(ids, s, k, request_id=rid) for rid, (ids, s, k) in sent.items()]
    channel, client = stub(tiny_server.address)
    with channel:
        responses = list(client.ScoreStream(iter(requests)))
    assert sorted(r.request_id for r in responses) == sorted(sent)
    for response in responses:
        assert response.WhichOneof("outcome") == "result"
        ids, start, k = sent[response.request_id]
        assert response.result.request_id == response.request_id
        check_rows(response.result, tiny_ref.logprobs(ids, start), ids, start, k)


@pytest.mark.parametrize("temperature", [0.35, 2.5])
def test_temperature_scales_logits_before_log_softmax(
    tiny_server: ThreadedServer, tiny_ref: Reference, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(int(temperature * 100))
    ids, start = random_sequence(gen, TINY_VOCAB, min_len=20, max_len=80)
    rows = ids.shape[0] - start
    query = torch.randint(0, TINY_VOCAB, (rows, 3), generator=gen)
    channel, client = stub(tiny_server.address)
    with channel:
        response = client.Score(
            make_request(ids, start, 16, query_ids=query, temperature=temperature)
        )
        plain = decode_result(client.Score(make_request(ids, start, 16)))
    check_rows(response, tiny_ref.logprobs(ids, start, temperature), ids, start, 16, query)
    # And it really changed the distribution: T < 1 sharpens, T > 1 flattens the top-1.
    top1 = decode_result(response).topk_logprobs[:, 0]
    if temperature < 1:
        assert bool((top1 >= plain.topk_logprobs[:, 0] - TOL).all())
    else:
        assert bool((top1 <= plain.topk_logprobs[:, 0] + TOL).all())


@pytest.mark.parametrize(
    ("wire_dtype", "torch_dtype", "tol"),
    [(pb.DTYPE_FLOAT16, torch.float16, 2e-3), (pb.DTYPE_BFLOAT16, torch.bfloat16, 1.6e-2)],
)
def test_half_precision_outputs_are_rounded_float32_rows(
    tiny_server: ThreadedServer,
    tiny_ref: Reference,
    wire_dtype: int,
    torch_dtype: torch.dtype,
    tol: float,
) -> None:
    gen = torch.Generator().manual_seed(5 + wire_dtype)
    ids, start = random_sequence(gen, TINY_VOCAB, min_len=10, max_len=80)
    rows = ids.shape[0] - start
    query = torch.randint(0, TINY_VOCAB, (rows, 5), generator=gen)
    channel, client = stub(tiny_server.address)
    with channel:
        response = client.Score(
            make_request(ids, start, 8, query_ids=query, logprob_dtype=wire_dtype)
        )
        full = client.Score(make_request(ids, start, 8, query_ids=query))
    for field in ("topk_logprobs", "token_logprobs", "query_logprobs", "leftover_logmass"):
        assert getattr(response, field).dtype == wire_dtype, field
    got, exact = decode_result(response), decode_result(full)
    assert got.topk_logprobs.dtype == torch_dtype
    torch.testing.assert_close(got.topk_ids, exact.topk_ids)
    for field in ("topk_logprobs", "token_logprobs", "query_logprobs", "leftover_logmass"):
        # The half-precision values are the float32 values rounded to the dtype.
        expected = getattr(exact, field).to(torch_dtype)
        torch.testing.assert_close(getattr(got, field), expected, atol=0, rtol=0)
    check_rows(response, tiny_ref.logprobs(ids, start), ids, start, 8, query, atol=tol)


def test_vocab_above_100k(big_vocab: tuple[ThreadedServer, Path]) -> None:
    server, model_dir = big_vocab
    ref = Reference.load(model_dir)
    gen = torch.Generator().manual_seed(128)
    channel, client = stub(server.address)
    with channel:
        info = client.Info(pb.InfoRequest())
        assert info.teachers[0].vocab_size == BIG_VOCAB
        for top_k in (1, 64):
            ids, start = random_sequence(gen, BIG_VOCAB, min_len=8, max_len=40)
            ids[-1] = BIG_VOCAB - 1  # the last id of the vocabulary is a valid target
            rows = ids.shape[0] - start
            query = torch.randint(100_000, BIG_VOCAB, (rows, 4), generator=gen)
            response = client.Score(make_request(ids, start, top_k, query_ids=query))
            check_rows(response, ref.logprobs(ids, start), ids, start, top_k, query)


def test_topk_covering_the_vocabulary_leaves_no_mass(tiny_server: ThreadedServer) -> None:
    gen = torch.Generator().manual_seed(40)
    ids, start = random_sequence(gen, MICRO_VOCAB, min_len=5, max_len=30)
    channel, client = stub(tiny_server.address)
    with channel:
        response = client.Score(make_request(ids, start, MICRO_VOCAB, teacher="micro"))
    got = decode_result(response)
    assert response.teacher == "micro"
    assert bool(torch.isneginf(got.leftover_logmass).all())
    # Every id appears once per row, and the probabilities sum to one.
    assert bool((got.topk_ids.sort(dim=1).values == torch.arange(MICRO_VOCAB)).all())
    torch.testing.assert_close(
        got.topk_logprobs.double().exp().sum(1),
        torch.ones(got.topk_ids.shape[0]).double(),
        atol=1e-5,
        rtol=0,
    )


def test_info_describes_every_teacher(tiny_server: ThreadedServer) -> None:
    channel, client = stub(tiny_server.address)
    with channel:
        info = client.Info(pb.InfoRequest())
    assert info.default_teacher == "tiny"
    by_name = {t.name: t for t in info.teachers}
    assert by_name["tiny"].vocab_size == TINY_VOCAB
    assert by_name["micro"].vocab_size == MICRO_VOCAB
    assert by_name["micro"].max_top_k == MICRO_VOCAB  # capped at the vocabulary
    assert by_name["tiny"].max_top_k == 64
    assert by_name["tiny"].max_sequence_length == 256
    assert by_name["tiny"].max_query_ids == 256
    assert len(by_name["tiny"].tokenizer_fingerprint) == 64
    assert set(by_name["tiny"].logprob_dtypes) == {
        pb.DTYPE_FLOAT32,
        pb.DTYPE_FLOAT16,
        pb.DTYPE_BFLOAT16,
    }
