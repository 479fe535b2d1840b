"""The error messages quoted in docs/service.md are the server's, word for word.

Each row of its "Example messages" table names a request; this file knows how to build
each one, sends it to a real server and compares the status message with the row's.
A row without a builder here, or a builder without a row, fails the test, so the doc
and the test move together. The INTERNAL example in the prose is checked at the codec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from teacher_service.codec import encode_result
from teacher_service.errors import ServiceError
from teacher_service.server import ThreadedServer
from teacher_service.types import ScoreResult
from teacher_service.v1 import teacher_pb2 as pb
from tests.teacher_service.wire import make_request

DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def _request(length: int = 10, **fields: object) -> bytes:
    ids = torch.randint(0, 500, (length,), generator=torch.Generator().manual_seed(length))
    request = make_request(ids, length // 2, 4)
    for name, value in fields.items():
        setattr(request, name, value)
    return request.SerializeToString()


def _ids(values: list[int]) -> bytes:
    request = make_request(torch.tensor(values), 1, 4)
    return request.SerializeToString()


# The doc's request column -> the bytes sent to Score.
REQUESTS: dict[str, Callable[[], bytes]] = {
    "`top_k` 65": lambda: _request(top_k=65),
    "`token_ids` [5, 6, 512]": lambda: _ids([5, 6, 512]),
    "`token_ids` of 257 ids": lambda: _request(257),
    "`start` 0": lambda: _request(start=0),
    "`temperature` 1e-38": lambda: _request(temperature=1e-38),
    '`teacher` "big"': lambda: _request(teacher="big"),
    '`teacher` of 100 × "x"': lambda: _request(teacher="x" * 100),
    "the bytes ff ff ff": lambda: b"\xff\xff\xff",
}


def _doc_table() -> dict[str, str]:
    """{request cell: message without its backticks} of the "Example messages" table."""
    text = DOC.read_text()
    section = text.split("### Example messages", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(.+)` \|$", section, re.M)
    return {request: message for request, message in rows if request != "request"}


def test_every_example_has_a_request() -> None:
    assert set(_doc_table()) == set(REQUESTS)


@pytest.mark.parametrize("row", sorted(REQUESTS))
def test_example_message_is_the_servers(tiny_server: ThreadedServer, row: str) -> None:
    expected = _doc_table()[row]
    with grpc.insecure_channel(tiny_server.address) as channel:
        score = channel.unary_unary(
            "/teacher_service.v1.TeacherService/Score",
            request_serializer=lambda data: data,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            score(REQUESTS[row](), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == expected


def test_the_internal_example_is_the_codecs() -> None:
    quoted = re.search(
        r"INTERNAL \(`(topk_logprobs: the teacher produced [^`]+)`\)", DOC.read_text()
    )
    assert quoted, "docs/service.md lost its withheld-result example"
    text = " ".join(quoted.group(1).split())  # the doc wraps the line
    rows, k = 3, 4
    nan = torch.full((rows, k), float("nan"))
    result = ScoreResult(torch.zeros(rows, k, dtype=torch.int32), nan, nan[:, 0], None, nan[:, 0])
    with pytest.raises(ServiceError) as caught:
        encode_result("r", "t", result, torch.float32)
    assert caught.value.message == text
