"""From vLLM prompt log-probs (FlatLogprobs) to the service's `ScoreResult`.

vLLM returns, for every prompt position p >= 1, the log-prob of the token that actually
sits at p followed by the top-n log-probs of the distribution that predicted it, n being
the request's `prompt_logprobs`. With `flat_logprobs=True` these arrive as five flat
Python lists plus start/end offsets per position, so no object is built per entry.

Row r of a result describes token ids[start + r], i.e. prompt position start + r, which
is always one of the *last* R = L - start positions vLLM returned. Slicing from the end
keeps this correct both when vLLM returns every prompt position (V1 model runner, where
positions served from the prefix cache hold garbage) and when it returns only the
positions it computed (V2 model runner); the backend makes sure every needed position
was computed (see `VllmBackend` on prefix caching).

Two conversions:

    topk rows  (prompt_logprobs = K, temperature 1):
        token  = entry 0                                  [R]
        topk   = entries 1..K (already sorted)            [R, K]
        leftover = log(1 - sum exp(topk))                 [R]   (accuracy: see
                                                                `leftover_from_topk`)
    full rows  (prompt_logprobs = V: any temperature, query ids):
        logp[r, id] = entry for id, scattered back to vocabulary order   [R, V]
        then exactly the PyTorch backend's `summarize_rows`, since
        log_softmax(logp / T) == log_softmax(logits / T) for a row's log-probs logp.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from teacher_service.backends.logprob_rows import summarize_rows
from teacher_service.types import ScoreItem, ScoreResult


def last_rows(flat: Any, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `num_rows` positions of a FlatLogprobs as dense arrays.

    Returns:
        ids int64 [R, W] and logprobs float32 [R, W], W = 1 + n entries per position
        (entry 0 is the actual token). Raises RuntimeError if vLLM returned fewer
        positions or positions of different widths (neither happens for a complete
        prompt-logprobs request; it would mean a vLLM change this code must follow).
    """
    positions = len(flat.start_indices)
    if positions < num_rows:
        raise RuntimeError(f"vLLM returned {positions} prompt positions, need {num_rows}")
    first = positions - num_rows
    starts = np.asarray(flat.start_indices[first:], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first:], dtype=np.int64)
    widths = ends - starts
    width = int(widths[0])
    if width < 1 or not np.all(widths == width) or not np.all(starts[1:] == ends[:-1]):
        raise RuntimeError("vLLM prompt log-probs rows are ragged or empty")
    lo, hi = int(starts[0]), int(ends[-1])
    ids = torch.tensor(flat.token_ids[lo:hi], dtype=torch.int64).view(num_rows, width)
    logprobs = torch.tensor(flat.logprobs[lo:hi], dtype=torch.float32).view(num_rows, width)
    return ids, logprobs


def leftover_from_topk(topk_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log(1 - sum exp(topk)) per row, from the top-K alone: float32 [R].

    Computed as log(-expm1(logsumexp(topk))) in float64, so this step adds no error of
    its own. The error is in the input: vLLM's float32 log-softmax rounds its normaliser
    log(sum exp(logits)) by a relative delta that every log-prob of the row shares, so
    the mass m left outside the top-K comes out within about delta of the truth
    (absolute), i.e. log m within about delta / m. delta grows with V (float32 sums):
    ~1.5e-9 * V on CPU (1.4e-6 at V = 1000, 3e-5 at 32k, 1.3e-4 at 152k). Where a
    small leftover mass must be exact, use full rows or the PyTorch backend, which sum
    the complement directly. Covering the whole vocabulary gives -inf exactly.
    """
    rows = topk_logprobs.shape[0]
    if topk_logprobs.shape[1] >= vocab_size:
        return torch.full((rows,), float("-inf"))
    inside = torch.logsumexp(topk_logprobs.double(), dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(inside)).float()


def topk_result(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    item: ScoreItem,
    vocab_size: int,
    query_logprobs: torch.Tensor | None = None,
) -> ScoreResult:
    """ScoreResult from prompt_logprobs = K rows (temperature 1).

    Args:
        ids / logprobs: [R, 1 + K] from `last_rows`.
        query_logprobs: float32 [R, Q] from vLLM's token-id scoring, or None.
    """
    k = item.top_k
    if ids.shape[1] < 1 + k:
        raise RuntimeError(f"vLLM returned {ids.shape[1] - 1} log-probs per row, need {k}")
    topk_logprobs = logprobs[:, 1 : 1 + k].contiguous()
    return ScoreResult(
        topk_ids=ids[:, 1 : 1 + k].to(torch.int32),
        topk_logprobs=topk_logprobs,
        token_logprobs=logprobs[:, 0].contiguous(),
        query_logprobs=query_logprobs,
        leftover_logmass=leftover_from_topk(topk_logprobs, vocab_size),
    )


def full_row_result(
    ids: torch.Tensor, logprobs: torch.Tensor, item: ScoreItem, vocab_size: int
) -> ScoreResult:
    """ScoreResult from prompt_logprobs = V rows: any temperature, query ids, exact leftover.

    Args:
        ids / logprobs: [R, 1 + V] from `last_rows` (entry 0 repeats the actual token).
    """
    rows = item.num_rows
    if ids.shape[1] < 1 + vocab_size:
        raise RuntimeError(f"vLLM returned {ids.shape[1] - 1} log-probs per row, need V")
    logp = torch.full((rows, vocab_size), float("-inf"))
    logp.scatter_(1, ids[:, 1 : 1 + vocab_size], logprobs[:, 1 : 1 + vocab_size])
    scores = summarize_rows(
        logp,
        item.token_ids[item.start :],
        torch.full((rows,), item.top_k, dtype=torch.int64),
        torch.full((rows,), item.temperature, dtype=torch.float32),
        item.query_ids,
    )
    return ScoreResult(
        topk_ids=scores.topk_ids.to(torch.int32),
        topk_logprobs=scores.topk_logprobs,
        token_logprobs=scores.token_logprobs,
        query_logprobs=scores.query_logprobs,
        leftover_logmass=scores.leftover_logmass,
    )
