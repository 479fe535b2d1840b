"""The client's tensors equal the server's own arrays: bit-exact in float32, correctly
rounded in float16/bfloat16, with query ids and temperature; malformed answers raise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teacher_service.codec import encode_result
from teacher_service.types import ScoreResult
from teacher_service.v1 import teacher_pb2 as pb
from tests.trainer.client_fixtures import (  # noqa: F401
    VOCAB,
    backend_scores,
    model_dir,
    random_specs,
    thread_server,
)
from trainer.client import ClientConfig, ScoreSpec, TeacherClient, TeacherError
from trainer.client.wire import decode_scores


def _expect_equal(got: object, want: ScoreResult, dtype: torch.dtype) -> None:
    """`got` (client, float32) equals the backend's float32 arrays rounded to `dtype`."""
    assert got.topk_ids.dtype == torch.int64
    for name in ("topk_logprobs", "token_logprobs", "leftover_logmass"):
        assert getattr(got, name).dtype == torch.float32, name
    torch.testing.assert_close(got.topk_ids, want.topk_ids.long(), rtol=0, atol=0)
    for name in ("topk_logprobs", "token_logprobs", "leftover_logmass", "query_logprobs"):
        expected = getattr(want, name)
        if expected is None:
            assert getattr(got, name) is None
            continue
        torch.testing.assert_close(
            getattr(got, name), expected.to(dtype).float(), rtol=0, atol=0, equal_nan=True
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_client_tensors_equal_backend_arrays(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
    dtype: torch.dtype,
) -> None:
    # Batches of one on the server, so its forward has exactly the reference's shapes.
    specs = random_specs(gen, 4, top_k=7, logprob_dtype=dtype)
    specs += random_specs(gen, 4, top_k=3, query=True, temperature=0.7, logprob_dtype=dtype)
    reference = backend_scores(model_dir, specs)
    server = thread_server(model_dir, max_batch_size=1)
    try:
        with TeacherClient(ClientConfig(endpoints=(server.address,))) as client:
            client.connect(vocab_size=VOCAB)
            results = client.score_batch(specs)
    finally:
        server.stop()
    assert [r.request_id for r in results] == [s.request_id for s in specs]
    for got, want in zip(results, reference, strict=True):
        _expect_equal(got, want, dtype)


def _random_result(gen: torch.Generator, rows: int, k: int, q: int | None) -> ScoreResult:
    lp = -torch.rand(rows, k, generator=gen) * 10
    return ScoreResult(
        topk_ids=torch.randint(0, VOCAB, (rows, k), generator=gen, dtype=torch.int32),
        topk_logprobs=lp.sort(dim=-1, descending=True).values,
        token_logprobs=-torch.rand(rows, generator=gen) * 10,
        query_logprobs=None if q is None else -torch.rand(rows, q, generator=gen) * 10,
        leftover_logmass=torch.cat([torch.tensor([float("-inf")]), -torch.rand(rows - 1)]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q", [None, 5])
def test_decode_of_encoded_arrays(gen: torch.Generator, dtype: torch.dtype, q: int | None) -> None:
    length, start, k = 30, 9, 6
    spec = ScoreSpec(
        torch.randint(0, VOCAB, (length,), generator=gen), start, k,
        None if q is None else torch.zeros(length - start, q, dtype=torch.long),
        logprob_dtype=dtype,
    )  # fmt: skip
    want = _random_result(gen, length - start, k, q)
    message = pb.ScoreStreamResponse(request_id="r1", result=encode_result("r1", "t", want, dtype))
    got = decode_scores(pb.ScoreStreamResponse.FromString(
        message.SerializeToString()), spec, "here")  # fmt: skip
    _expect_equal(got, want, dtype)
    assert got.request_id == "r1" and got.endpoint == "here"


def test_malformed_response_raises(gen: torch.Generator) -> None:
    spec = ScoreSpec(torch.randint(0, VOCAB, (20,), generator=gen), 5, 4)
    wrong_rows = _random_result(gen, 14, 4, None)  # the request has R = 15 rows
    message = pb.ScoreStreamResponse(
        request_id="r", result=encode_result("r", "t", wrong_rows, torch.float32)
    )
    with pytest.raises(
        TeacherError, match=r"topk_ids has shape \[14, 4\], expected \[15, 4\] for R = 15 rows"
    ):
        decode_scores(message, spec, "here")
    truncated = pb.ScoreStreamResponse(request_id="r")
    truncated.result.CopyFrom(message.result)
    truncated.result.token_logprobs.data = truncated.result.token_logprobs.data[:-1]
    with pytest.raises(TeacherError, match=r"token_logprobs\.data"):
        decode_scores(truncated, spec, "here")
    too_wide = _random_result(gen, 15, 5, None)  # K = 5 > top_k = 4
    message = pb.ScoreStreamResponse(
        request_id="r", result=encode_result("r", "t", too_wide, torch.float32)
    )
    with pytest.raises(TeacherError, match="top-K width 5, asked for 4"):
        decode_scores(message, spec, "here")
    with_query = ScoreSpec(spec.token_ids, 5, 5, torch.zeros(15, 3, dtype=torch.long))
    wrong_q = _random_result(gen, 15, 5, 2)
    message = pb.ScoreStreamResponse(
        request_id="r", result=encode_result("r", "t", wrong_q, torch.float32)
    )
    with pytest.raises(TeacherError, match=r"query_logprobs has shape \[15, 2\]"):
        decode_scores(message, with_query, "here")
