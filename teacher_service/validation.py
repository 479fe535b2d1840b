"""Checks a ScoreRequest against a teacher's limits and turns it into a ScoreItem.

Every check raises ServiceError(INVALID_ARGUMENT) whose message names the field and the
bound that was violated, so a user's mistake never reaches the scheduler or the backend
(and never surfaces as INTERNAL). Cheap checks on declared shapes run before any bytes
are decoded, so an oversized tensor is refused without copying it.

Shapes: L = len(token_ids), R = L - start response rows, Q = query ids per row.

Temperature: log-probs are log_softmax(logits / T) over the full vocabulary, computed
in float32 (the definition vLLM gives prompt log-probs under a temperature). T must lie
in [MIN_TEMPERATURE, MAX_TEMPERATURE]. Below 1e-2 the distribution is already one-hot
to float32 precision for any logit gap above ~1, and logits / T overflows float32 near
T = 1e-37 (then every log-prob is NaN); above 1e2 it is uniform to within 1% for logits
spanning less than 1: neither end says anything a distillation target needs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from teacher_service.codec import decode, shape_text, torch_logprob_dtype
from teacher_service.errors import echo, invalid
from teacher_service.types import ScoreItem
from teacher_service.v1 import teacher_pb2 as pb

# The wire carries temperature as float32: compare against the float32 values of the
# bounds, so that a client sending exactly 0.01 is inside.
MIN_TEMPERATURE = float(torch.tensor(1e-2, dtype=torch.float32))
MAX_TEMPERATURE = float(torch.tensor(1e2, dtype=torch.float32))


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed validation: what to score and how to encode the answer."""

    request_id: str
    teacher: str
    item: ScoreItem
    logprob_dtype: torch.dtype


def resolve_teacher(name: str, hosted: Collection[str], default: str) -> str:
    """The teacher a request names; empty means the default."""
    if not name:
        return default
    if name not in hosted:
        raise invalid(f"teacher: unknown teacher {echo(name)}; hosted: {sorted(hosted)}")
    return name


def validate_request(request: pb.ScoreRequest, info: pb.TeacherInfo) -> ValidRequest:
    """A ValidRequest for `request` scored by the teacher described by `info`.

    Raises ServiceError(INVALID_ARGUMENT) for: missing or malformed token_ids, an empty
    or too long sequence, ids outside [0, vocab_size), start outside [1, L - 1], top_k
    outside [1, max_top_k], query_ids not int32 [R, Q] with 1 <= Q <= max_query_ids or
    holding ids outside the vocabulary, a temperature outside [MIN_TEMPERATURE,
    MAX_TEMPERATURE] (or NaN), and an unknown log-prob dtype.
    """
    token_ids = _token_ids(request, info)
    length = int(token_ids.shape[0])
    if not 1 <= request.start <= length - 1:
        raise invalid(
            f"start: {request.start} is out of range; need 1 <= start <= L - 1 = {length - 1}"
        )
    if not 1 <= request.top_k <= info.max_top_k:
        raise invalid(
            f"top_k: {request.top_k} is out of range; need 1 <= top_k <= {info.max_top_k}"
        )
    rows = length - request.start
    query_ids = _query_ids(request, info, rows) if request.HasField("query_ids") else None
    temperature = 1.0
    if request.HasField("temperature"):
        temperature = float(request.temperature)
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # False for NaN too
            raise invalid(
                f"temperature: {temperature:g} is out of range; need "
                f"{MIN_TEMPERATURE:g} <= temperature <= {MAX_TEMPERATURE:g}"
            )
    logprob_dtype = torch_logprob_dtype(request.logprob_dtype)
    if request.logprob_dtype != pb.DTYPE_UNSPECIFIED and request.logprob_dtype not in set(
        info.logprob_dtypes
    ):
        raise invalid(f"logprob_dtype: {pb.DType.Name(request.logprob_dtype)} is not served")
    item = ScoreItem(
        token_ids=token_ids.to(torch.int64),
        start=request.start,
        top_k=request.top_k,
        query_ids=query_ids,
        temperature=temperature,
    )
    return ValidRequest(request.request_id, info.name, item, logprob_dtype)


def _token_ids(request: pb.ScoreRequest, info: pb.TeacherInfo) -> torch.Tensor:
    """int32 [L] with 2 <= L <= max_sequence_length and every id in the vocabulary."""
    if not request.HasField("token_ids"):
        raise invalid("token_ids: required (int32 [L] tensor)")
    shape = request.token_ids.shape
    if len(shape) != 1:
        raise invalid(f"token_ids.shape: expected 1 dimension [L], got {shape_text(shape)}")
    length = shape[0]
    if length < 0:
        raise invalid(f"token_ids.shape: L = {length} must be >= 0")
    if length == 0:
        raise invalid(f"token_ids: empty sequence; need 2 <= L <= {info.max_sequence_length}")
    if length > info.max_sequence_length:
        raise invalid(
            f"token_ids: sequence too long, L = {length} > max_sequence_length "
            f"{info.max_sequence_length}"
        )
    if length < 2:
        raise invalid("token_ids: L = 1 leaves no token to score; need L >= 2")
    ids = decode(request.token_ids, "token_ids", expect_dtype=pb.DTYPE_INT32, expect_ndim=1)
    _check_vocab(ids, "token_ids", info.vocab_size)
    return ids


def _query_ids(request: pb.ScoreRequest, info: pb.TeacherInfo, rows: int) -> torch.Tensor:
    """int64 [R, Q] query ids, each in the vocabulary."""
    if not info.supports_query_ids:
        raise invalid(f"query_ids: teacher {info.name!r} does not support query ids")
    shape = list(request.query_ids.shape)
    if len(shape) != 2:
        raise invalid(f"query_ids.shape: expected 2 dimensions [R, Q], got {shape_text(shape)}")
    if shape[0] != rows:
        raise invalid(
            f"query_ids.shape: {shape} must have R = L - start = {rows} rows, got {shape[0]}"
        )
    if not 1 <= shape[1] <= info.max_query_ids:
        raise invalid(
            f"query_ids.shape: Q = {shape[1]} is out of range; need 1 <= Q <= "
            f"max_query_ids {info.max_query_ids}"
        )
    query = decode(request.query_ids, "query_ids", expect_dtype=pb.DTYPE_INT32, expect_ndim=2)
    _check_vocab(query, "query_ids", info.vocab_size)
    return query.to(torch.int64)


def _check_vocab(ids: torch.Tensor, field: str, vocab_size: int) -> None:
    """Raises naming the first id outside [0, vocab_size)."""
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        index = [int(i) for i in torch.nonzero(bad)[0]]
        where = ",".join(str(i) for i in index)
        value = int(ids[tuple(index)])
        raise invalid(f"{field}[{where}]: id {value} is outside the vocabulary [0, {vocab_size})")
