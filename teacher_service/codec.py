"""Conversion between protobuf `Tensor` messages and torch tensors, both directions.

Arrays travel as little-endian bytes with a dtype and a shape (see proto/). Decoding is
one buffer copy (`numpy.frombuffer`), never a per-element loop. The server uses this
module to read requests and write responses; the client imports the same functions to
read responses, so both ends agree byte for byte. Proto types stop here: nothing below
the servicer sees a message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from teacher_service.errors import invalid
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
        raise invalid(f"{field}.shape: expected {expect_ndim} dimensions, got {list(shape)}")
    if any(d < 0 for d in shape):
        raise invalid(f"{field}.shape: dimensions must be >= 0, got {list(shape)}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise invalid(f"{field}.shape: {count} elements exceeds the limit of {max_elements}")
    np_dtype, torch_dtype = _WIRE[msg.dtype]
    if len(msg.data) != count * np_dtype.itemsize:
        raise invalid(
            f"{field}.data: {len(msg.data)} bytes, but shape {list(shape)} of "
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
    """A backend result as the ScoreResponse sent to the client."""
    return pb.ScoreResponse(
        request_id=request_id,
        teacher=teacher,
        topk_ids=encode(result.topk_ids, torch.int32),
        topk_logprobs=encode(result.topk_logprobs, logprob_dtype),
        token_logprobs=encode(result.token_logprobs, logprob_dtype),
        query_logprobs=(
            encode(result.query_logprobs, logprob_dtype)
            if result.query_logprobs is not None
            else None
        ),
        leftover_logmass=encode(result.leftover_logmass, logprob_dtype),
    )


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
