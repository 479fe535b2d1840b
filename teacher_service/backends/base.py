"""The interface every teacher backend implements (PyTorch/transformers, vLLM).

The scheduler owns queueing, fairness and batching; a backend only turns a batch of
validated `ScoreItem`s into `ScoreResult`s. `score` is a coroutine so that a backend
with its own engine loop (vLLM) can overlap batches, while a backend with a blocking
forward (PyTorch) runs it on one executor thread and never blocks the event loop.

Scoring semantics, identical for all backends (see DESIGN.md § Contracts): for item
`ids[0..L-1]` and `start`, row r = 0..R-1 (R = L - start) is the distribution over the
token at position start + r given ids[..start + r - 1], computed as a full
log_softmax(logits / temperature) in float32 over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from teacher_service.types import ScoreItem, ScoreResult, TeacherMeta


@runtime_checkable
class Backend(Protocol):
    """A loaded teacher model that scores batches of sequences."""

    @property
    def meta(self) -> TeacherMeta:
        """Static facts about the model (vocab size, limits, tokenizer fingerprint)."""
        ...

    @property
    def max_concurrent_batches(self) -> int:
        """How many `score` calls the scheduler may keep in flight at once.

        1 for a backend that computes one batch at a time (PyTorch); more for an engine
        that batches internally and benefits from a steady feed (vLLM).
        """
        ...

    async def start(self) -> None:
        """Loads weights and runs a warm-up so that readiness means ready."""
        ...

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Scores a batch; result i belongs to items[i].

        Items are already validated (ids in range, start/top_k/query shape within
        bounds). Raises ServiceError only for conditions the validator cannot know
        (for example a backend that refuses query ids).
        """
        ...

    def dead_reason(self) -> str | None:
        """None while the backend can serve; else why not (one line).

        The server polls it for liveness, readiness and the gRPC health service (see
        `teacher_service.backends.health`). Cheap and non-blocking: it reads state.
        """
        ...

    async def close(self) -> None:
        """Releases the model and any worker processes."""
        ...
