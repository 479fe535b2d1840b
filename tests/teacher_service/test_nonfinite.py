"""No answer with status OK carries a non-finite log-prob, whatever produced it.

The codec withholds such a result (INTERNAL naming the array) and the other items of
the same batch are answered as usual. A real model whose embedding row for one token is
NaN makes the NaNs here; the codec's rule is also checked directly on each array.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_service.codec import FLOAT16_MIN, decode, decode_result, encode_result
from teacher_service.errors import ErrorKind, ServiceError
from teacher_service.random_model import save_random_model
from teacher_service.server import ThreadedServer
from teacher_service.types import ScoreResult
from tests.teacher_service.conftest import start_thread_server
from tests.teacher_service.wire import Reference, make_request, stub

VOCAB = 96
POISON = 7  # its embedding row is NaN: every position from it onwards is NaN
BATCH = 6


def _result(gen: torch.Generator, rows: int = 5, k: int = 3, q: int = 2) -> ScoreResult:
    return ScoreResult(
        topk_ids=torch.randint(0, VOCAB, (rows, k), generator=gen, dtype=torch.int32),
        topk_logprobs=-torch.rand(rows, k, generator=gen).sort(-1).values * 5,
        token_logprobs=-torch.rand(rows, generator=gen) * 5,
        query_logprobs=-torch.rand(rows, q, generator=gen) * 5,
        leftover_logmass=-torch.rand(rows, generator=gen),
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "field", ["topk_logprobs", "token_logprobs", "query_logprobs", "leftover_logmass"]
)
def test_codec_withholds_non_finite_log_probs(field: str, bad: float) -> None:
    gen = torch.Generator().manual_seed(hash((field, bad)) % 10_000)
    result = _result(gen)
    array = getattr(result, field)
    index = tuple(int(torch.randint(0, n, (), generator=gen)) for n in array.shape)
    array[index] = bad
    if field == "leftover_logmass" and bad == -math.inf:
        # -inf leftover is the documented "top-K holds the whole vocabulary".
        got = decode_result(encode_result("r", "t", result, torch.float32))
        assert got.leftover_logmass[index] == -math.inf
        return
    with pytest.raises(ServiceError) as caught:
        encode_result("r", "t", result, torch.float32)
    assert caught.value.kind is ErrorKind.INTERNAL
    assert caught.value.message.startswith(f"{field}: the teacher produced 1 non-finite value")


def test_float16_saturates_instead_of_underflowing_to_minus_inf() -> None:
    result = _result(torch.Generator().manual_seed(3))
    result.token_logprobs[1] = -70_000.0  # finite in float32, below float16's range
    result.leftover_logmass[0] = -math.inf
    message = encode_result("r", "t", result, torch.float16)
    token = decode(message.token_logprobs, "token_logprobs")
    assert token[1].item() == FLOAT16_MIN and bool(torch.isfinite(token).all())
    assert decode(message.leftover_logmass, "leftover_logmass")[0].item() == -math.inf


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model whose embedding of token POISON is NaN."""
    path = save_random_model(
        tmp_path_factory.mktemp("nan"), VOCAB, hidden=32, layers=1, heads=4, max_positions=64
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[POISON] = math.nan
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nan_server(nan_model_dir: Path) -> Iterator[ThreadedServer]:
    """Batches of exactly BATCH sequences (a partial batch waits up to 10 s)."""
    server = start_thread_server(("nan", nan_model_dir), max_batch_size=BATCH, max_wait_s=10.0)
    try:
        yield server
    finally:
        server.stop()


def _sequence(gen: torch.Generator, poisoned: bool) -> tuple[torch.Tensor, int]:
    length = int(torch.randint(6, 40, (), generator=gen))
    ids = torch.randint(0, VOCAB, (length,), generator=gen)
    ids[ids == POISON] = POISON + 1
    if poisoned:
        ids[int(torch.randint(0, length - 1, (), generator=gen))] = POISON
    return ids, int(torch.randint(1, length, (), generator=gen))


def test_a_nan_item_fails_alone_and_its_batch_mates_are_answered(
    nan_server: ThreadedServer, nan_model_dir: Path
) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    poisoned = {i for i in range(BATCH) if i % 3 == 1}
    sequences = [_sequence(gen, i in poisoned) for i in range(BATCH)]
    requests = [
        make_request(ids, start, 4, request_id=str(i)) for i, (ids, start) in enumerate(sequences)
    ]
    registry = nan_server.metrics.registry
    batches = {"teacher": "nan"}
    before = registry.get_sample_value("teacher_service_batch_size_count", batches) or 0
    channel, client = stub(nan_server.address)
    with channel:
        responses = list(client.ScoreStream(iter(requests), timeout=60))
    after = registry.get_sample_value("teacher_service_batch_size_count", batches) or 0
    assert after - before == 1  # all of them in one backend batch
    ref = Reference.load(nan_model_dir)
    assert len(responses) == BATCH
    for response in responses:
        index = int(response.request_id)
        if index in poisoned:
            assert response.WhichOneof("outcome") == "error"
            assert response.error.code == grpc.StatusCode.INTERNAL.value[0]
            assert "non-finite" in response.error.message
            continue
        assert response.WhichOneof("outcome") == "result", response.error
        ids, start = sequences[index]
        got = decode_result(response.result)
        want = ref.logprobs(ids, start).gather(1, ids[start:, None])[:, 0]
        torch.testing.assert_close(got.token_logprobs, want, atol=1e-5, rtol=1e-5)
        assert bool(torch.isfinite(got.topk_logprobs).all())
    code = {"method": "ScoreStream", "code": "INTERNAL"}
    assert registry.get_sample_value("teacher_service_requests_total", code) == len(poisoned)


def test_unary_score_of_a_nan_item_is_internal(nan_server: ThreadedServer) -> None:
    gen = torch.Generator().manual_seed(5)
    calls = []
    channel, client = stub(nan_server.address)
    with channel:
        for i in range(BATCH):  # one full batch: the first is poisoned
            ids, start = _sequence(gen, poisoned=i == 0)
            calls.append(client.Score.future(make_request(ids, start, 2), timeout=60))
        with pytest.raises(grpc.RpcError) as caught:
            calls[0].result()
        assert all(call.result().topk_ids.shape[0] > 0 for call in calls[1:])
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "token_logprobs" in caught.value.details() or "topk_logprobs" in caught.value.details()
    assert "non-finite" in caught.value.details()
