"""The client's side of the wire: ScoreSpec -> ScoreRequest, ScoreResponse -> tensors.

Arrays go through `teacher_service.codec`, the same functions the server uses, so both
ends agree byte for byte; decoding is one buffer copy per array. Shapes: R = L - start
rows, K = top-K width, Q = query ids per row.
"""

from __future__ import annotations

import torch

from teacher_service.codec import decode_result, encode
from teacher_service.errors import ServiceError
from teacher_service.v1 import teacher_pb2 as pb
from trainer.client.errors import TeacherError
from trainer.client.types import ScoreSpec, TeacherScores

_WIRE_DTYPES = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
}


def build_request(spec: ScoreSpec, request_id: str, teacher: str) -> pb.ScoreRequest:
    """The ScoreRequest for a validated spec; ids travel as int32."""
    return pb.ScoreRequest(
        request_id=request_id,
        teacher=teacher,
        token_ids=encode(spec.token_ids, torch.int32),
        start=spec.start,
        top_k=spec.top_k,
        query_ids=encode(spec.query_ids, torch.int32) if spec.query_ids is not None else None,
        temperature=spec.temperature,
        logprob_dtype=_WIRE_DTYPES[spec.logprob_dtype],
    )


def decode_scores(response: pb.ScoreStreamResponse, spec: ScoreSpec, target: str) -> TeacherScores:
    """A result message as TeacherScores (int64 ids, float32 log-probs), shapes checked.

    Raises TeacherError naming the endpoint and the array when the answer does not fit
    the request (wrong rows, ragged top-K, wrong query width, bad bytes).
    """
    try:
        d = decode_result(response.result)
    except ServiceError as error:
        raise TeacherError(f"malformed response from {target}: {error.message}") from None
    rows = int(spec.token_ids.shape[0]) - spec.start
    width = d.topk_ids.shape[1] if d.topk_ids.dim() == 2 else -1
    want: dict[str, tuple[torch.Tensor | None, tuple[int, ...]]] = {
        "topk_ids": (d.topk_ids, (rows, width)),
        "topk_logprobs": (d.topk_logprobs, (rows, width)),
        "token_logprobs": (d.token_logprobs, (rows,)),
        "leftover_logmass": (d.leftover_logmass, (rows,)),
    }
    if spec.query_ids is not None:
        want["query_logprobs"] = (d.query_logprobs, tuple(spec.query_ids.shape))
    for name, (tensor, shape) in want.items():
        if tensor is None or tuple(tensor.shape) != shape:
            got = None if tensor is None else list(tensor.shape)
            raise TeacherError(
                f"malformed response from {target}: {name} has shape {got}, expected "
                f"{list(shape)} for R = {rows} rows"
            )
    if not 1 <= width <= spec.top_k:
        raise TeacherError(
            f"malformed response from {target}: top-K width {width}, asked for {spec.top_k}"
        )
    return TeacherScores(
        topk_ids=d.topk_ids.long(),
        topk_logprobs=d.topk_logprobs.float(),
        token_logprobs=d.token_logprobs.float(),
        query_logprobs=d.query_logprobs.float() if spec.query_ids is not None else None,
        leftover_logmass=d.leftover_logmass.float(),
        request_id=response.request_id,
        endpoint=target,
    )
