"""Plain data types shared by the scheduler and the backends.

These are the service's internal currency: the codec turns protobuf messages into
`ScoreItem`s and `ScoreResult`s back into messages, so nothing below the servicer
sees a proto type. Shapes use R = number of response rows = L - start, K = top_k,
Q = query ids per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ScoreItem:
    """One sequence to score, already validated against the teacher's limits.

    Attributes:
        token_ids: int64 [L] prompt + response, on CPU.
        start: index of the first response token, 1 <= start <= L - 1.
        top_k: number of top log-probs per row.
        query_ids: int64 [R, Q] ids whose log-probs are wanted per row, or None.
        temperature: log-probs are log_softmax(logits / temperature).
    """

    token_ids: torch.Tensor
    start: int
    top_k: int
    query_ids: torch.Tensor | None = None
    temperature: float = 1.0

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return self.length - self.start


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Scores for one ScoreItem; row r describes token ids[start + r].

    Attributes:
        topk_ids: int32 [R, K] teacher top-K ids, highest log-prob first.
        topk_logprobs: float32 [R, K] their log-probs.
        token_logprobs: float32 [R] log-prob of the token that actually followed.
        query_logprobs: float32 [R, Q] log-probs at the item's query ids, or None.
        leftover_logmass: float32 [R] log(1 - sum exp(topk_logprobs)); -inf when the
            top-K holds the whole vocabulary.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor
    query_logprobs: torch.Tensor | None
    leftover_logmass: torch.Tensor


@dataclass(frozen=True, slots=True)
class TeacherMeta:
    """What a backend knows about its model; the servicer turns it into TeacherInfo."""

    model_name: str
    revision: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sequence_length: int
    backend: str
    supports_query_ids: bool
