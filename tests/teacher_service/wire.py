"""Helpers shared by the teacher-service tests: build requests, compute reference rows.

The reference is the plain transformers path: one unbatched forward, logits of the
scored positions, log_softmax in float32 — independent of the backend's chunked
hidden-state route.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from transformers import AutoModelForCausalLM

from teacher_service.codec import encode
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc


def make_request(
    ids: torch.Tensor,
    start: int,
    top_k: int,
    *,
    request_id: str = "",
    teacher: str = "",
    query_ids: torch.Tensor | None = None,
    temperature: float | None = None,
    logprob_dtype: int = pb.DTYPE_UNSPECIFIED,
) -> pb.ScoreRequest:
    """A ScoreRequest for int ids [L] (sent as int32) and optional query ids [R, Q]."""
    request = pb.ScoreRequest(
        request_id=request_id,
        teacher=teacher,
        token_ids=encode(ids.to(torch.int32)),
        start=start,
        top_k=top_k,
        logprob_dtype=logprob_dtype,
    )
    if query_ids is not None:
        request.query_ids.CopyFrom(encode(query_ids.to(torch.int32)))
    if temperature is not None:
        request.temperature = temperature
    return request


def random_sequence(
    gen: torch.Generator, vocab: int, min_len: int = 2, max_len: int = 64
) -> tuple[torch.Tensor, int]:
    """Random ids [L] in [0, vocab) and a random start in [1, L - 1]."""
    length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
    ids = torch.randint(0, vocab, (length,), generator=gen)
    start = int(torch.randint(1, length, (1,), generator=gen))
    return ids, start


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.TeacherServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.TeacherServiceStub(channel)


@dataclass
class Reference:
    """A teacher model loaded the plain way, to compute expected rows."""

    model: torch.nn.Module

    @staticmethod
    def load(model_dir: Path) -> Reference:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return Reference(model)

    @torch.inference_mode()
    def logprobs(self, ids: torch.Tensor, start: int, temperature: float = 1.0) -> torch.Tensor:
        """float32 [R, V]: row r is log_softmax(logits at position start + r - 1 / T)."""
        logits = self.model(input_ids=ids[None].to(torch.int64)).logits[0].float()
        return torch.log_softmax(logits[start - 1 : -1] / temperature, dim=-1)


def leftover_from_topk(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """float64 log(1 - sum(exp(topk))) per row, -inf when the top-K holds everything."""
    mass = topk_logprobs.double().exp().sum(-1)
    return torch.log1p(-mass.clamp(max=1.0))


def assert_close_rows(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=atol)


def finite_max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    both = torch.isfinite(a) & torch.isfinite(b)
    return float((a.double() - b.double())[both].abs().max()) if bool(both.any()) else math.nan


def assert_same_topk(
    got_ids: torch.Tensor,
    got_lp: torch.Tensor,
    want_ids: torch.Tensor,
    want_lp: torch.Tensor,
    atol: float = 1e-5,
) -> None:
    """Two top-K answers [R, K] for the same rows agree, allowing ids to swap only where
    the log-probs tie within `atol`: a different batch composition changes the float
    summation order, so a near-tie may be ordered either way. A swap at the last rank may
    bring in an id tied with the unseen rank K + 1, which the values alone vouch for.
    """
    torch.testing.assert_close(got_lp, want_lp, atol=atol, rtol=atol)
    differ = got_ids != want_ids
    close = (want_lp[:, 1:] - want_lp[:, :-1]).abs() <= atol  # rank k ties rank k + 1
    tied = torch.zeros_like(differ)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    tied[:, -1] = True
    assert not bool((differ & ~tied).any()), f"ids differ at untied ranks: {differ & ~tied}"
