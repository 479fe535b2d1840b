"""The connect-time handshake: is the teacher behind every endpoint the one we expect?

Distillation against a teacher with a different vocabulary or tokenizer silently trains
on misaligned ids, so the client refuses to start instead, with a message that names
each difference and both values. Replicas are also compared with each other: two
endpoints serving different checkpoints would make results depend on balancing luck.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from teacher_service.codec import LOGPROB_DTYPES
from teacher_service.v1 import teacher_pb2 as pb
from trainer.client.errors import HandshakeError
from trainer.client.types import TeacherInfo

_TORCH_DTYPES = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
}
assert set(_TORCH_DTYPES) == set(LOGPROB_DTYPES)


@dataclass(frozen=True)
class Expectation:
    """What the student requires of the teacher; None fields are not checked."""

    vocab_size: int | None = None
    tokenizer_fingerprint: str | None = None


def select_teacher(response: pb.InfoResponse, wanted: str, target: str) -> TeacherInfo:
    """The TeacherInfo named `wanted` ("" = the server's default) from one endpoint.

    Raises HandshakeError naming the endpoint and the teachers it hosts when absent.
    """
    name = wanted or response.default_teacher
    for teacher in response.teachers:
        if teacher.name == name:
            return TeacherInfo(
                name=teacher.name,
                model_name=teacher.model_name,
                revision=teacher.revision,
                vocab_size=int(teacher.vocab_size),
                tokenizer_fingerprint=teacher.tokenizer_fingerprint,
                max_top_k=int(teacher.max_top_k),
                max_sequence_length=int(teacher.max_sequence_length),
                backend=teacher.backend,
                logprob_dtypes=tuple(
                    _TORCH_DTYPES[d] for d in teacher.logprob_dtypes if d in _TORCH_DTYPES
                ),
                supports_query_ids=bool(teacher.supports_query_ids),
                max_query_ids=int(teacher.max_query_ids),
                server_version=response.server_version,
                endpoint=target,
            )
    hosted = ", ".join(repr(t.name) for t in response.teachers) or "none"
    what = f"teacher {wanted!r}" if wanted else f"default teacher {name!r}"
    raise HandshakeError(f"{what} is not hosted by endpoint {target}; it hosts: {hosted}")


def student_differences(info: TeacherInfo, expect: Expectation) -> list[str]:
    """Each way `info` fails `expect`, as 'what: student X vs teacher Y' phrases."""
    diffs = []
    if expect.vocab_size is not None and expect.vocab_size != info.vocab_size:
        diffs.append(f"vocab size: student {expect.vocab_size} vs teacher {info.vocab_size}")
    if (
        expect.tokenizer_fingerprint is not None
        and expect.tokenizer_fingerprint != info.tokenizer_fingerprint
    ):
        diffs.append(
            f"tokenizer fingerprint: student {expect.tokenizer_fingerprint} vs teacher "
            f"{info.tokenizer_fingerprint}"
        )
    return diffs


def replica_differences(reference: TeacherInfo, other: TeacherInfo) -> list[str]:
    """Each way two endpoints' descriptions of the same teacher disagree."""
    fields = ("vocab_size", "tokenizer_fingerprint", "model_name", "revision")
    return [
        f"{field.replace('_', ' ')}: {getattr(reference, field)} at {reference.endpoint} vs "
        f"{getattr(other, field)} at {other.endpoint}"
        for field in fields
        if getattr(reference, field) != getattr(other, field)
    ]


def check(info: TeacherInfo, expect: Expectation, reference: TeacherInfo | None) -> None:
    """Raises HandshakeError listing every difference from the student and the reference."""
    diffs = student_differences(info, expect)
    if reference is not None and reference.endpoint != info.endpoint:
        diffs += replica_differences(reference, info)
    if diffs:
        raise HandshakeError(
            f"teacher {info.name!r} at {info.endpoint} does not match: " + "; ".join(diffs)
        )
