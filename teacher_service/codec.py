"""Conversion between protobuf `Tensor` messages and torch tensors, both directions.

Arrays travel as little-endian bytes with a dtype and a shape (see proto/). Decoding is
one buffer copy (`numpy.frombuffer`), never a per-element loop. The server uses this
module to read requests and write responses; the client imports the same functions to
read responses, so both ends agree byte for byte. Proto types stop here: nothing below
the servicer sees a message.

Requests arrive as raw bytes (the server registers its methods without a protobuf
deserializer) and are parsed here by `parse_message`, so that bytes which are not a
message become one INVALID_ARGUMENT for that request instead of a failed call.

`encode_result` is the last gate before a response leaves: a log-prob that is NaN or
+inf, or -inf anywhere but in `leftover_logmass` (where -inf means "the top-K holds
the whole vocabulary"), fails that one item with INTERNAL, whatever produced it, so no
answer with status OK ever carries one. float16 log-probs below its range saturate at
-65504 (a probability under e^-65504 is zero in every float format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

from teacher_service.errors import internal, invalid, truncate
from teacher_service.types import ScoreResult
from teacher_service.v1 import teacher_pb2 as pb

# dtype enum -> (numpy little-endian storage dtype, torch dtype). bfloat16 has no numpy
# dtype, so it is stored as uint16 and reinterpreted with Tensor.view.
_WIRE: dict[int, tuple[np.dtype, torch.dtype]] = {
    pb.DTYPE_INT32: (np.dtype("<i4"), torch.int32),
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), torch.float32),
    pb.DTYPE_FLOAT16: (np.dtype("<f2"), torch.float16),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), torch.bfloat16),
}
_TORCH_TO_WIRE = {torch_dtype: enum for enum, (_, torch_dtype) in _WIRE.items()}

LOGPROB_DTYPES: tuple[int, ...] = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
# Shapes echoed in messages show at most this many dimensions.
_SHAPE_ECHO_DIMS = 6
FLOAT16_MIN = float(torch.finfo(torch.float16).min)  # -65504

M = TypeVar("M", bound=Message)


def parse_message(raw: bytes | M, message_type: type[M]) -> M:
    """`raw` parsed as a `message_type`; a message passes through unchanged.

    Raises ServiceError(INVALID_ARGUMENT) when the bytes are not a well-formed message
    of that type (corrupt or truncated wire format, invalid UTF-8 in a string field).
    A field sent with the wrong wire type is kept as an unknown field by protobuf, so
    the request then fails validation on the field it lacks.
    """
    if isinstance(raw, message_type):
        return raw
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        name = message_type.DESCRIPTOR.full_name
        cause = truncate(str(exc).rpartition(": ")[2] or "parse error", 80)
        raise invalid(
            f"request: {len(raw)} bytes are not a valid {name} message ({cause})"
        ) from None


def shape_text(shape: object) -> str:
    """A shape for an error message: '[3, 4]', or its first dimensions and the rank."""
    dims = list(shape)  # type: ignore[call-overload]
    if len(dims) <= _SHAPE_ECHO_DIMS:
        return str(dims)
    head = ", ".join(str(d) for d in dims[:_SHAPE_ECHO_DIMS])
    return f"[{head}, ...] ({len(dims)} dimensions)"


def dtype_name(dtype: int) -> str:
    """'DTYPE_FLOAT16' for an enum value, or the number when it is not a known value."""
    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return str(dtype)


def torch_logprob_dtype(dtype: int, field: str = "logprob_dtype") -> torch.dtype:
    """The torch dtype a client asked its log-probs in; UNSPECIFIED means float32."""
    if dtype == pb.DTYPE_UNSPECIFIED:
        return torch.float32
    if dtype not in LOGPROB_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in LOGPROB_DTYPES)
        raise invalid(f"{field}: unsupported dtype {dtype_name(dtype)}; allowed: {allowed}")
    return _WIRE[dtype][1]


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """A CPU tensor (cast to `dtype` first if given) as a wire Tensor."""
    t = tensor.detach().to("cpu")
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"cannot encode dtype {t.dtype}")
    enum = _TORCH_TO_WIRE[t.dtype]
    storage = t.contiguous().view(torch.uint16) if t.dtype == torch.bfloat16 else t.contiguous()
    array = storage.numpy()
    if array.dtype.byteorder == ">":  # keep the wire little-endian on any host
        array = array.byteswap()
    return pb.Tensor(dtype=enum, shape=list(t.shape), data=array.tobytes())


def decode(
    msg: pb.Tensor,
    field: str,
    *,
    expect_dtype: int | None = None,
    expect_ndim: int | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """A wire Tensor as a fresh CPU torch tensor, checking that it is well formed.

    Raises ServiceError(INVALID_ARGUMENT) naming `field` when the dtype is unknown or
    unexpected, the rank is wrong, a dimension is negative, the element count exceeds
    `max_elements`, or the byte length does not match dtype and shape.
    """
    if msg.dtype not in _WIRE:
        raise invalid(f"{field}.dtype: unknown dtype {dtype_name(msg.dtype)}")
    if expect_dtype is not None and msg.dtype != expect_dtype:
        raise invalid(
            f"{field}.dtype: expected {dtype_name(expect_dtype)}, got {dtype_name(msg.dtype)}"
        )
    shape = tuple(int(d) for d in msg.shape)
    if expect_ndim is not None and len(shape) != expect_ndim:
        raise invalid(f"{field}.shape: expected {expect_ndim} dimensions, got {shape_text(shape)}")
    if any(d < 0 for d in shape):
        raise invalid(f"{field}.shape: dimensions must be >= 0, got {shape_text(shape)}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise invalid(f"{field}.shape: {count} elements exceeds the limit of {max_elements}")
    np_dtype, torch_dtype = _WIRE[msg.dtype]
    if len(msg.data) != count * np_dtype.itemsize:
        raise invalid(
            f"{field}.data: {len(msg.data)} bytes, but shape {shape_text(shape)} of "
            f"{dtype_name(msg.dtype)} needs {count * np_dtype.itemsize}"
        )
    array = np.frombuffer(msg.data, dtype=np_dtype, count=count).reshape(shape)
    tensor = torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))
    return tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor


@dataclass(frozen=True, slots=True)
class DecodedScores:
    """A ScoreResponse as torch tensors (R rows, K top ids, Q query ids).

    topk_ids int32 [R, K]; topk_logprobs, token_logprobs [R], query_logprobs [R, Q] or
    None, leftover_logmass [R] in the dtype the request asked for.
    """

    request_id: str
    teacher: str
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor
    query_logprobs: torch.Tensor | None
    leftover_logmass: torch.Tensor


def encode_result(
    request_id: str, teacher: str, result: ScoreResult, logprob_dtype: torch.dtype
) -> pb.ScoreResponse:
    """A backend result as the ScoreResponse sent to the client.

    Raises ServiceError(INTERNAL) naming the array and the count when a log-prob is
    not finite (see the module docstring); nothing is encoded then.
    """
    _check_finite("topk_logprobs", result.topk_logprobs)
    _check_finite("token_logprobs", result.token_logprobs)
    if result.query_logprobs is not None:
        _check_finite("query_logprobs", result.query_logprobs)
    _check_finite("leftover_logmass", result.leftover_logmass, allow_neg_inf=True)
    return pb.ScoreResponse(
        request_id=request_id,
        teacher=teacher,
        topk_ids=encode(result.topk_ids, torch.int32),
        topk_logprobs=_encode_logprobs(result.topk_logprobs, logprob_dtype),
        token_logprobs=_encode_logprobs(result.token_logprobs, logprob_dtype),
        query_logprobs=(
            _encode_logprobs(result.query_logprobs, logprob_dtype)
            if result.query_logprobs is not None
            else None
        ),
        leftover_logmass=_encode_logprobs(result.leftover_logmass, logprob_dtype),
    )


def _check_finite(field: str, logprobs: torch.Tensor, *, allow_neg_inf: bool = False) -> None:
    """Raises INTERNAL when `logprobs` holds NaN or +inf (or -inf unless allowed)."""
    ok = torch.isfinite(logprobs)
    if allow_neg_inf:
        ok |= torch.isneginf(logprobs)
    if bool(ok.all()):
        return
    bad = ~ok
    raise internal(
        f"{field}: the teacher produced {int(bad.sum())} non-finite values of "
        f"{logprobs.numel()} ({int(torch.isnan(logprobs).sum())} NaN); the result is "
        "withheld"
    )


def _encode_logprobs(logprobs: torch.Tensor, dtype: torch.dtype) -> pb.Tensor:
    """Log-probs in the wire dtype; float16 saturates at its lowest finite value so that
    a representable-in-float32 log-prob never becomes -inf on the wire."""
    if dtype == torch.float16:
        finite = torch.isfinite(logprobs)
        logprobs = torch.where(finite, logprobs.clamp(min=FLOAT16_MIN), logprobs)
    return encode(logprobs, dtype)


def response_bytes(rows: int, top_k: int, query_width: int, logprob_dtype: torch.dtype) -> int:
    """Bytes of the arrays `encode_result` writes for R rows, K, Q (0 without query ids).

    ids are int32; topk, token, query and leftover log-probs are in `logprob_dtype`.
    The message framing adds a few dozen bytes on top.
    """
    size = torch.tensor([], dtype=logprob_dtype).element_size()
    return rows * (top_k * (4 + size) + size * (2 + query_width))


def decode_result(msg: pb.ScoreResponse) -> DecodedScores:
    """A ScoreResponse as tensors; the inverse of `encode_result`."""
    return DecodedScores(
        request_id=msg.request_id,
        teacher=msg.teacher,
        topk_ids=decode(msg.topk_ids, "topk_ids"),
        topk_logprobs=decode(msg.topk_logprobs, "topk_logprobs"),
        token_logprobs=decode(msg.token_logprobs, "token_logprobs"),
        query_logprobs=(
            decode(msg.query_logprobs, "query_logprobs") if msg.HasField("query_logprobs") else None
        ),
        leftover_logmass=decode(msg.leftover_logmass, "leftover_logmass"),
    )
