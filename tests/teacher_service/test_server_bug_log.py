"""A server bug that every request hits answers INTERNAL each time but logs one
traceback per minute, not one per request (anyone could trigger it in a loop)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
import torch

from teacher_service.codec import encode
from teacher_service.metrics import Metrics
from teacher_service.servicer import HostedTeacher, TeacherServicer
from teacher_service.types import ScoreItem, ScoreResult
from teacher_service.v1 import teacher_pb2 as pb

CALLS = 40


class _BrokenScheduler:
    async def submit(
        self, item: ScoreItem, client_id: str, deadline: float | None = None
    ) -> ScoreResult:
        raise RuntimeError("a bug below the servicer")


class _Aborted(Exception):
    pass


class _Context:
    """The parts of grpc.aio.ServicerContext that Score uses."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str, **_: object) -> None:
        self.code, self.details = code, details
        raise _Aborted


def test_a_bug_hit_by_every_request_logs_one_traceback(caplog: pytest.LogCaptureFixture) -> None:
    info = pb.TeacherInfo(
        name="t", vocab_size=50, max_top_k=8, max_sequence_length=64, logprob_dtypes=[2]
    )
    metrics = Metrics()
    servicer = TeacherServicer({"t": HostedTeacher(info, _BrokenScheduler())}, "t", metrics, "x")
    request = pb.ScoreRequest(token_ids=encode(torch.arange(10, dtype=torch.int32)), start=4)
    request.top_k = 3
    raw = request.SerializeToString()
    caplog.set_level(logging.INFO)

    async def run() -> list[_Context]:
        contexts = []
        for _ in range(CALLS):
            context = _Context()
            with pytest.raises(_Aborted):
                await servicer.Score(raw, context)  # type: ignore[arg-type]
            contexts.append(context)
        return contexts

    contexts = asyncio.run(run())
    assert {c.code for c in contexts} == {grpc.StatusCode.INTERNAL}
    assert {c.details for c in contexts} == {"internal error (see server log)"}
    internal = {"method": "Score", "code": "INTERNAL"}
    assert metrics.registry.get_sample_value("teacher_service_requests_total", internal) == CALLS
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]
    assert "RuntimeError: a bug below the servicer" in caplog.text
